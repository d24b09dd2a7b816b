"""Sequence parallelism (``shared.distributed.sequence_parallel``) equals one process.

One launch of ``check_ring.py`` on 2 gloo processes and one on 4 (both at once) run
ring attention, Ulysses attention and 3 AdamW steps of a GPT whose sequence is split
over the ranks; the tests here compute the same things in one process, in float64,
and compare: attention outputs and q/k/v gradients against ``causal_attention`` and
PyTorch's ``scaled_dot_product_attention``, the GPT's losses, first gradients and
final weights, and the bytes the ring sends. Two tests need no launch: the online
softmax block by block, and ring attention in a world of one.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from shared import distributed as D
from shared.attention import causal_attention
from shared.distributed.sequence_parallel import (
    online_softmax_step,
    ring_attention,
    sequence_parallel_loss,
    ulysses_attention,
)
from shared.model import GPT, GPTConfig
from shared.train import parameter_groups

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "check_ring.py"
SIZES = (2, 4)
VARIANTS = ("learned_ring", "rope_ring", "rope_ulysses")
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path | Exception]:
    base = tmp_path_factory.mktemp("ring")

    def run(n: int) -> Path:
        D.launch(SCRIPT, ["--out", base / str(n)], nproc=n, echo=None, timeout=300)
        return base / str(n)

    with ThreadPoolExecutor(len(SIZES)) as pool:
        futures = {n: pool.submit(run, n) for n in SIZES}
    return {n: f.exception() or f.result() for n, f in futures.items()}


def run_dir(runs, n: int) -> Path:
    if isinstance(runs[n], Exception):
        pytest.fail(f"the {n}-process launch failed: {runs[n]}", pytrace=False)
    return runs[n]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def reference_attention(t: dict[str, torch.Tensor], impl) -> list[torch.Tensor]:
    """Output and q, k, v gradients of ``impl`` on the whole sequence."""
    q, k, v = (t[x].clone().requires_grad_() for x in "qkv")
    out = impl(q, k, v)
    out.backward(t["grad_out"])
    return [out.detach(), q.grad, k.grad, v.grad]


ONE_PROCESS = {
    "fused": causal_attention,
    "explicit": lambda q, k, v: causal_attention(q, k, v, impl="explicit"),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["ring", "ulysses"])
def test_attention_equals_one_process(runs, n, name):
    t = load_file(str(run_dir(runs, n) / "attention.safetensors"))
    got = [t[f"{name}.{x}"] for x in ("out", "dq", "dk", "dv")]
    for impl in ONE_PROCESS.values():
        want = reference_attention(t, impl)
        assert max(map(max_diff, got, want)) < 1e-12
    assert got[0].abs().max() > 0.1 and got[2].abs().max() > 0.1  # not all zeros


def one_process_run(files: dict[str, torch.Tensor], pos_encoding: str):
    """The worker's 3 AdamW steps in one process: losses, first grads, weights."""
    config = GPTConfig(vocab_size=64, context_length=32, n_layer=2, n_head=4,
                       n_embd=32, pos_encoding=pos_encoding)  # fmt: skip
    model = GPT(config).double()
    model.load_state_dict({k[5:]: v for k, v in files.items() if k[:5] == "init."})
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    losses, grads = [], {}
    for step in range(STEPS):
        idx = files[f"batch.{step}"]
        opt.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
    return losses, grads, model.state_dict()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_training_equals_one_process(runs, n, variant):
    path = run_dir(runs, n)
    files = load_file(str(path / f"gpt_{variant}.safetensors"))
    losses, grads, final = one_process_run(files, variant.split("_")[0])
    got = json.loads((path / "result.json").read_text())["gpt"][variant]["losses"]
    assert got == pytest.approx(losses, abs=1e-12, rel=0)
    assert len(grads) == len([k for k in files if k.startswith("grad.")])
    for k, g in grads.items():
        assert max_diff(files[f"grad.{k}"], g) < 1e-12, k
    for k, w in final.items():
        assert max_diff(files[f"final.{k}"], w) < 1e-10, k


@pytest.mark.parametrize("n", SIZES)
def test_ring_sends_n_minus_1_kv_blocks_per_layer_forward(runs, n):
    result = json.loads((run_dir(runs, n) / "result.json").read_text())
    block = result["block_bytes"]  # one (B, H, T/N, d) float64 tensor
    ring = result["attention_traffic"]["ring"]
    assert ring["forward"] == {
        "send": {"calls": 2 * (n - 1), "bytes": 2 * (n - 1) * block}
    }
    # backward: k, v forwarded N-1 times, dk, dv N times (back home)
    want = (2 * (n - 1) + 2 * n) * block
    assert ring["backward"]["send"]["bytes"] == want
    gpt = result["gpt"]["rope_ring"]["traffic"]
    assert gpt["forward"]["send"]["bytes"] == 2 * 2 * (n - 1) * block  # 2 layers
    assert gpt["backward"]["send"]["bytes"] == 2 * want
    # Ulysses: 3 all-to-alls (q, k, v) and 1 back, of the local (B, H, T/N, d)
    ulysses = result["attention_traffic"]["ulysses"]
    assert ulysses["forward"] == {"all_to_all": {"calls": 4, "bytes": 4 * block}}
    assert ulysses["backward"] == {"all_to_all": {"calls": 4, "bytes": 4 * block}}


# ------------------------------------------------------------------------ no launch


def test_online_softmax_block_by_block_equals_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 4, generator=gen, dtype=torch.float64)
               for _ in range(3))  # fmt: skip
    k_all = torch.randn(2, 3, 24, 4, generator=gen, dtype=torch.float64)
    v_all = torch.randn(2, 3, 24, 4, generator=gen, dtype=torch.float64)
    # the queries are the last 8 of 32 positions: 3 past blocks, then the diagonal
    keys, values = torch.cat([k_all, k], dim=2), torch.cat([v_all, v], dim=2)
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    state = (m, torch.zeros_like(m), torch.zeros_like(q))
    state = online_softmax_step(q, k, v, *state, diagonal=True)  # diagonal first
    for j in (8, 0, 16):  # the order of the past blocks does not matter
        state = online_softmax_step(q, k_all[:, :, j : j + 8], v_all[:, :, j : j + 8],
                                    *state)  # fmt: skip
    m, l, acc = state  # noqa: E741
    want = causal_attention(q, keys, values, impl="explicit")  # bottom-right causal
    assert max_diff(acc / l[..., None], want) < 1e-14
    scores = q @ keys.transpose(-2, -1) / 2  # sqrt(d) = 2
    future = torch.ones(8, 32, dtype=torch.bool).triu(25)
    lse = torch.logsumexp(scores.masked_fill(future, float("-inf")), dim=-1)
    assert max_diff(m + l.log(), lse) < 1e-14  # what backward keeps of the softmax


def test_in_one_process_ring_and_ulysses_are_causal_attention():
    gen = torch.Generator().manual_seed(0)
    t = {x: torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64)
         for x in ("q", "k", "v", "grad_out")}  # fmt: skip
    want = reference_attention(t, ONE_PROCESS["explicit"])
    for attention in (ring_attention, ulysses_attention):
        got = reference_attention(t, attention)
        assert max(map(max_diff, got, want)) < 1e-14


def test_sequence_parallel_loss_in_one_process_is_the_mean():
    config = GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2,
                       n_embd=16, pos_encoding="rope")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).double()
    idx = torch.randint(0, 64, (2, 17))
    targets = idx[:, 1:].clone()
    targets[0, :5] = -100  # ignored targets: the mean counts only the others
    logits = model(idx[:, :-1])
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    got = sequence_parallel_loss(model, idx[:, :-1], targets)
    assert abs(got.item() - want.item()) < 1e-14
