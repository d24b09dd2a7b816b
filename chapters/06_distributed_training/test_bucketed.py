"""``BucketedDDP`` (shared/distributed/bucketed.py): gradient buckets all-reduced during
backward give the very training of one process and of PyTorch's DDP.

One launch of ``check_bucketed.py`` (2 gloo processes, float64) trains a tiny GPT at
several bucket sizes, with DDP and in one process; the ranks build different models,
so equality also proves the initial broadcast. The tests in one process (a gloo group
of one) check how the buckets are built, rebuilt and launched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared import distributed as D
from shared.distributed.bucketed import BucketedDDP
from shared.model import GPT, GPTConfig

HERE = Path(__file__).resolve().parent
BUCKETED = ["none", "tiny", "mid", "mid_no_rebuild", "timeline"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bucketed")
    D.launch(HERE / "check_bucketed.py", ["--out", out], nproc=2, echo=None,
             timeout=300)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def params(out: Path, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{run}.safetensors"))


def max_diff(out: Path, a: str, b: str) -> float:
    pa, pb = params(out, a), params(out, b)
    assert sorted(pa) == sorted(pb)
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


# ------------------------------------------------------------------ two processes


@pytest.mark.parametrize("run", BUCKETED)
def test_bucketed_trains_as_one_process_and_as_ddp(out, results, run):
    assert max_diff(out, run, "single") < 1e-12  # measured 1.8e-14
    # a sum of two numbers and a halving are exact in any order: DDP's own buckets
    # give the very same bits
    assert max_diff(out, run, "ddp") == 0.0
    # the averaged gradient (the sum would have twice the norm), before clipping
    want = results["single"]["norms"]
    assert results[run]["norms"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("run", ["side_tiny", "side_mid"])
def test_a_parameter_one_rank_or_no_rank_uses(out, results, run):
    """``side`` is used on rank 0 only (rank 1 gets the average all the same),
    ``never`` on no rank (a zero gradient, where DDP leaves ``None``)."""
    assert max_diff(out, run, "side_single") < 1e-12
    assert max_diff(out, run, "side_ddp") < 1e-12  # not 0: clipping sums one more 0
    want = results["side_single"]["norms"]
    assert results[run]["norms"] == pytest.approx(want, rel=1e-12)
    assert results["side_mid"]["never_grad_per_rank"] == [[0.0] * 3] * 2
    assert results["side_ddp"]["never_grad"] is None


@pytest.mark.parametrize("run", ["none", "tiny", "mid", "mid_no_rebuild"])
def test_one_all_reduce_per_bucket_and_none_under_no_sync(out, results, run):
    record = results[run]
    assert record["no_sync_calls"] == []
    assert record["calls"] == [["all_reduce", n] for n in record["bucket_bytes"]]
    tensors = params(out, "single")  # the tied weight once
    assert sum(record["bucket_bytes"]) == 8 * sum(t.numel() for t in tensors.values())
    n_buckets = {"none": 1, "tiny": len(tensors)}.get(run, len(record["buckets"]))
    assert len(record["buckets"]) == n_buckets
    assert sorted(n for b in record["buckets"] for n in b) == sorted(tensors)


def test_the_timeline_shows_buckets_launched_in_order_during_backward(results):
    for events in results["timeline"]["events_per_rank"]:
        check_timeline(events, results["timeline"]["buckets"])


def check_timeline(events: list[dict], buckets: list[list[str]]) -> None:
    """One synchronised backward pass: every gradient once, buckets launched in order
    (the first while backward still runs), each done after its launch."""
    kinds = [e["kind"] for e in events]
    assert kinds[:3] == ["forward_start", "forward_end", "backward_start"]
    assert kinds[-1] == "finish_end"  # after every "done"
    at = {(e["kind"], e.get("name", e.get("bucket"))): i for i, e in enumerate(events)}
    assert len(at) == len(events)  # no event twice
    grads = [i for i, e in enumerate(events) if e["kind"] == "grad"]
    assert sorted(events[i]["name"] for i in grads) == sorted(sum(buckets, []))
    launches = [e["bucket"] for e in events if e["kind"] == "launch"]
    assert launches == list(range(len(buckets)))  # in order, each once
    assert all(at["launch", b] < at["done", b] for b in launches)
    assert at["launch", 0] < grads[-1]  # overlap: sent while backward goes on
    assert grads[-1] < at["finish_start", None]
    times = [e["t"] for e in events if e["kind"] != "done"]  # this thread's
    assert times == sorted(times)
    json.dumps(events)  # plain data for the notebook


# ------------------------------------------------------------------- one process

CONFIG = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, n_embd=32)


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).double()


def backward(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.context_length), generator=g)
    model(x, x)[1].backward()


def test_buckets_fill_in_reverse_order_up_to_their_size(world_of_one):
    model = gpt()
    model.transformer.h[0].ln_1.weight.requires_grad_(False)  # frozen: left out
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    size = {n: p.numel() * 8 for n, p in trained}
    limit = 0.02 * 2**20
    ddp = BucketedDDP(model, bucket_size_mb=0.02)
    names = [n for b in ddp.buckets for n in b]
    assert names == [n for n, _ in reversed(trained)]  # the tied weight once
    assert "transformer.h.0.ln_1.weight" not in names
    assert ddp.bucket_bytes == [sum(size[n] for n in b) for b in ddp.buckets]
    for b in ddp.buckets[:-1]:  # closed as soon as it holds the limit
        assert sum(size[n] for n in b[:-1]) < limit <= sum(size[n] for n in b)
    assert len(BucketedDDP(model, bucket_size_mb=None).buckets) == 1
    assert len(BucketedDDP(model, bucket_size_mb=1e-9).buckets) == len(trained)
    with pytest.raises(ValueError, match="bucket_size_mb"):
        BucketedDDP(model, bucket_size_mb=0)


def test_rebuilt_once_in_arrival_order_so_the_first_bucket_starts_early(world_of_one):
    """GPT registers ``wpe`` last: in reverse order it opens the first bucket, whose
    gradient comes last, and nothing could be sent before backward ends."""
    fixed = BucketedDDP(gpt(), 0.05, timeline=True, rebuild_buckets=False)
    rebuilt = BucketedDDP(gpt(), 0.05, timeline=True)
    assert fixed.buckets == rebuilt.buckets
    assert fixed.buckets[0][0] == "transformer.wpe.weight"
    for step in range(2):
        for m in (fixed, rebuilt):
            m.reset_timeline()
            backward(m, seed=step)
            m.finish_gradient_synchronization()
    assert rebuilt.buckets[-1][-2:] == [
        "transformer.wpe.weight",
        "transformer.wte.weight",
    ]
    assert fixed.buckets[0][0] == "transformer.wpe.weight"  # still
    check_timeline(rebuilt.events, rebuilt.buckets)
    kinds = [(e["kind"], e.get("name")) for e in fixed.events]
    first_launch = kinds.index(("launch", None))
    assert first_launch > kinds.index(("grad", "transformer.wpe.weight"))  # waited


def test_no_sync_accumulates_and_finishing_equals_plain_backward(world_of_one):
    plain, ddp = gpt(), BucketedDDP(gpt(), 0.05)
    for seed in (1, 2):
        backward(plain, seed)
    with D.count_collectives(1) as log, ddp.no_sync():
        backward(ddp, 1)
    assert log.calls == []
    backward(ddp, 2)
    ddp.finish_gradient_synchronization()
    for (n, p), q in zip(
        plain.named_parameters(), ddp.module.parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_a_second_backward_before_finishing_is_refused(world_of_one):
    ddp = BucketedDDP(gpt(), 0.05)
    backward(ddp)
    with pytest.raises(RuntimeError, match="ready twice"):
        backward(ddp)


class Halves(torch.nn.Module):
    """Two weights: ``b`` only when asked (a branch one micro-batch does not take)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # never used

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return (self.a * x).sum() + ((self.b * x * x).sum() if use_b else 0)


def test_gradients_not_in_the_last_pass_are_still_sent(world_of_one):
    """``b`` gets its gradient under ``no_sync`` only: the synchronised pass must
    send what ``b.grad`` accumulated, not zeros; ``c``, used nowhere, gets zeros."""
    ddp = BucketedDDP(Halves(), bucket_size_mb=1e-9)
    x = torch.arange(3.0, dtype=torch.float64)
    with ddp.no_sync():
        ddp(x, use_b=True).backward()
    ddp(x, use_b=False).backward()
    ddp.finish_gradient_synchronization()
    assert ddp.module.a.grad.tolist() == [0.0, 2.0, 4.0]
    assert ddp.module.b.grad.tolist() == [0.0, 1.0, 4.0]
    assert ddp.module.c.grad.tolist() == [0.0, 0.0, 0.0]
