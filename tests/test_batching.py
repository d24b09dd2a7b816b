"""Continuous batching: every request gets exactly its solo ``generate()`` tokens.

Requests of different prompt lengths, budgets and sampling settings join a running
batch at different steps, share one forward pass per step, leave early at a stop
id, and reuse the slots the finished ones freed; also for grouped-query attention
(one key/value head) and RoPE, and past the context window.
"""

from __future__ import annotations

import threading

import pytest
import torch

from shared.generation import (
    Request,
    Scheduler,
    SchedulerThread,
    SlotKVCache,
    generate,
)
from shared.model import GPT, GPTConfig

VOCAB, CONTEXT = 64, 32


def tiny(**overrides) -> GPT:
    """A tiny random GPT with sharp attention: GPT-2's initialisation (std 0.02)
    makes every attention score ~0, so keys would hardly matter to the tokens."""
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=2)
    model = GPT(GPTConfig(**(shape | {"n_embd": 16} | overrides))).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(0, 0.5)
    return model


MODELS = {
    "multi-head": {},
    "grouped-query, rope": {"n_head": 4, "n_kv_head": 1, "pos_encoding": "rope"},
}


def solo(model: GPT, request: Request) -> list[int]:
    """The request's tokens from ``generate`` alone, up to and with a stop id."""
    seed = request.seed
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    eos = request.stop_ids[0] if request.stop_ids else None
    out = generate(
        model, torch.tensor([list(request.prompt)]), request.max_new_tokens,
        request.temperature, request.top_k, request.top_p, eos, generator,
    )[0, len(request.prompt) :].tolist()  # fmt: skip
    return out[: out.index(eos) + 1] if eos in out else out


def requests(model: GPT, n: int, seed: int = 0) -> list[Request]:
    """``n`` requests: prompts of 1 to 40 ids (past the 32-id context), budgets of
    1 to 30 tokens, greedy or sampled with top-k / top-p; three in four stop at an
    id their solo text has halfway, so they leave early."""
    g = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=g))

    made = []
    for i in range(n):
        prompt = torch.randint(0, VOCAB, (draw(1, 41),), generator=g).tolist()
        made.append(
            Request(
                prompt, draw(1, 31), temperature=(0.0, 1.0, 0.7)[i % 3],
                top_k=(None, 10)[i % 2], top_p=(None, 0.9)[(i // 2) % 2],
                seed=100 + i,
            )
        )  # fmt: skip
        tokens = solo(model, made[-1])
        if i % 4 and len(tokens) > 2:
            made[-1].stop_ids = (tokens[len(tokens) // 2],)
    return made


@pytest.mark.parametrize("kind", MODELS)
def test_batched_tokens_equal_solo_generate(kind):
    model = tiny(**MODELS[kind])
    scheduler = Scheduler(model, max_batch=4)
    ran, todo, step = [], requests(model, 14), 0
    while todo or scheduler.has_work:  # a new request every other step
        if todo and step % 2 == 0:
            ran.append(scheduler.add(todo.pop(0)))
        scheduler.step()
        step += 1
        assert len(scheduler.running) <= 4  # 14 requests through 4 slots
    for request, reference in zip(ran, requests(model, 14), strict=True):
        assert request.tokens == solo(model, reference), request
        stopped = request.tokens[-1] in request.stop_ids
        assert request.finish_reason == ("stop" if stopped else "length")
    assert any(r.finish_reason == "stop" for r in ran)  # some left early
    assert max(scheduler.batch_sizes) >= 3  # they did share forward passes


@pytest.mark.parametrize("kind", MODELS)
def test_all_at_once_and_the_cache_shape(kind):
    model = tiny(**MODELS[kind])
    scheduler = Scheduler(model, max_batch=3)
    ran = scheduler.run(requests(model, 7, seed=1))
    for request, reference in zip(ran, requests(model, 7, seed=1), strict=True):
        assert request.tokens == solo(model, reference)
    cfg = model.config
    # one slot per place in the batch, n_kv_head heads: GQA's smaller cache
    head_dim = cfg.n_embd // cfg.n_head
    assert scheduler.cache.k.shape == (cfg.n_layer, 3, cfg.n_kv_head, CONTEXT, head_dim)
    assert scheduler.cache.lengths == [0, 0, 0] and not scheduler.running


def test_one_forward_pass_per_step_for_the_whole_batch():
    model = tiny()
    scheduler = Scheduler(model, max_batch=4)
    for request in requests(model, 4, seed=2):
        request.prompt, request.max_new_tokens, request.stop_ids = [1, 2, 3], 10, ()
        scheduler.add(request)
    scheduler.step()  # four prefills, one each
    calls = []
    forward = model.forward

    def counted(idx, *args, **kwargs):
        calls.append(tuple(idx.shape))
        return forward(idx, *args, **kwargs)

    model.forward = counted
    try:
        scheduler.step()
    finally:
        del model.forward
    assert calls == [(4, 1)]  # every request's next token from ONE pass


def test_a_finished_request_frees_its_slot_at_once():
    model = tiny()
    scheduler = Scheduler(model, max_batch=2)
    short, long_, waiting = (Request([1, 2, 3], n, temperature=0) for n in (2, 9, 3))
    for request in (short, long_, waiting):
        scheduler.add(request)
    scheduler.step()  # short and long_ prefill; waiting waits: no free slot
    assert [r.request for r in scheduler.running] == [short, long_]
    scheduler.step()  # short's second token: it leaves, long_ moves to slot 0
    assert short.done and [r.request for r in scheduler.running] == [long_]
    assert scheduler.cache.lengths == [4, 0]
    scheduler.step()  # waiting joins in the freed slot
    assert [r.request for r in scheduler.running] == [long_, waiting]
    scheduler.run()
    for request in (short, long_, waiting):
        assert request.tokens == solo(model, request)


def test_stop_ids_and_cancelling():
    model = tiny()
    reference = Request([7, 8], 20, temperature=0)
    tokens = solo(model, reference)
    stop = tokens[5]
    first = tokens.index(stop)
    scheduler = Scheduler(model, max_batch=2)
    stopped = Request([7, 8], 20, temperature=0, stop_ids=(stop,))
    cancelled = Request([7, 8], 20, temperature=0)
    scheduler.add(stopped)
    scheduler.add(cancelled)
    for _ in range(3):
        scheduler.step()
    cancelled.cancel()
    scheduler.run()
    assert stopped.tokens == tokens[: first + 1] and stopped.finish_reason == "stop"
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == tokens[:3]
    nothing = scheduler.run([Request([1], 0)])[0]
    assert nothing.tokens == [] and nothing.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(Request([], 3))


def test_the_slot_cache_moves_a_slot_whole():
    cache = SlotKVCache(n_layer=1, n_slots=2, max_len=4)
    k = torch.arange(2 * 3 * 2, dtype=torch.float).view(1, 2, 3, 2)
    rows = cache.rows([1])
    keys, _ = rows.update(0, k, k + 100)
    rows.advance(3)
    assert torch.equal(keys, k) and cache.lengths == [0, 3]
    cache.move(1, 0)
    assert cache.lengths == [3, 0]
    assert torch.equal(cache.k[0, 0, :, :3], k[0])
    assert torch.equal(cache.v[0, 0, :, :3], k[0] + 100)


def test_the_thread_streams_each_request_and_survives_a_failure():
    model = tiny()
    engine = SchedulerThread(model, max_batch=3)
    try:
        made = requests(model, 6, seed=3)
        results = {}

        def ask(i: int) -> None:
            results[i] = list(engine.submit(made[i]))  # tokens as they come

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for i, reference in enumerate(requests(model, 6, seed=3)):
            assert results[i] == made[i].tokens == solo(model, reference)

        def broken(*args, **kwargs):
            raise RuntimeError("the model broke")

        model.forward = broken
        try:
            with pytest.raises(RuntimeError, match="broke"):
                list(engine.submit(Request([1, 2], 5)))
        finally:
            del model.forward
        again = Request([1, 2], 5, temperature=0)
        assert list(engine.submit(again)) == solo(model, again)  # still serving
    finally:
        engine.close()
