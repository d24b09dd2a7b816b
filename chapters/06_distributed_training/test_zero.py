"""ZeRO-1 and ZeRO-2 by hand (shared/distributed/zero.py): the training of one process,
the traffic of the ring formulas and the memory of the ZeRO paper.

Two launches of ``check_zero.py`` (2 and 4 gloo processes, float64, side by side)
train a tiny GPT for 3 steps with AdamW (decay / no-decay groups), an lr that changes
every step, 2 micro-batches per step and clipping that clips; the 2-process launch
also runs ZeRO on a process group of one (N = 1) and the misuses.

Memory per rank, b bytes per element (8 here), P parameters, N ranks, measured from
the tensors (ZeRO paper, Table 1, without mixed precision):

    parameters       b P                 (stages 1 and 2 keep them whole)
    optimizer state  2 b P / N  + 4 k    (AdamW's two moments; one float32 step
                                          count for each of the rank's k pieces)
    gradients        stage 1: b P + b P / N   (whole .grad + the reduced share)
                     stage 2: b P / N         (+ about two buckets during backward)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared import distributed as D

HERE = Path(__file__).resolve().parent
SHARDED = ["zero1", "zero2", "zero2_no_sync"]
B = 8  # float64
ACCUM, CLIP = 2, 0.5  # as in check_zero.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("zero")

    def launch(n: int) -> Path:
        D.launch(HERE / "check_zero.py", ["--out", base / f"n{n}"], nproc=n,
                 echo=None, timeout=300)  # fmt: skip
        return base / f"n{n}"

    with ThreadPoolExecutor(2) as pool:  # both start up at once
        return dict(zip((2, 4), pool.map(launch, (2, 4)), strict=True))


def record(runs, n: int) -> dict:
    return json.loads((runs[n] / "record.json").read_text())


def params(runs, n: int, variant: str) -> dict[str, torch.Tensor]:
    return load_file(str(runs[n] / f"{variant}.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def n_params(runs) -> int:
    return sum(v.numel() for v in params(runs, 2, "single").values())


def calls(rec: dict, kind: str) -> list[int]:
    """The payload bytes of the last step's collectives of one kind."""
    return [size for k, size in rec["calls"] if k == kind]


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("variant", SHARDED)
def test_zero_trains_as_one_process_and_as_pytorch(runs, n, variant):
    mine = params(runs, n, variant)
    assert max_diff(mine, params(runs, n, "single")) < 1e-12  # measured 1.4e-14
    assert max_diff(mine, params(runs, n, "torch_zero")) < 1e-12
    # the all-gather hands every rank the very same parameters
    assert [r["replicas_differ"] for r in record(runs, n)[variant]] == [0.0] * n


@pytest.mark.parametrize("n", [2, 4])
def test_pytorch_zero_redundancy_optimizer_is_the_reference_too(runs, n):
    torch_zero = params(runs, n, "torch_zero")
    assert max_diff(torch_zero, params(runs, n, "single")) < 1e-12


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("variant", SHARDED)
def test_clipping_is_one_scalar_all_reduce_and_torch_s_norm(runs, n, variant):
    want = record(runs, n)["single"]["norms"]
    assert min(want) > CLIP  # every step really clips
    for rank in record(runs, n)[variant]:
        assert rank["norms"] == pytest.approx(want, rel=1e-12)
        assert calls(rank, "all_reduce") == [B]  # one float64 per step, all tensors


# ------------------------------------------------------------------ traffic


@pytest.mark.parametrize("n", [2, 4])
def test_zero1_sends_the_ring_formula_exactly(runs, n):
    p_bytes = B * n_params(runs)
    for rank in record(runs, n)["zero1"]:
        # one bucket (25 MiB): one reduce-scatter and one all-gather per step
        assert calls(rank, "reduce_scatter") == [p_bytes]
        assert calls(rank, "all_gather") == [p_bytes]
        log = D.CollectiveLog(n, [c for c in rank["calls"] if c[0] != "all_reduce"])
        assert log.sent() == D.bytes_per_step("zero1", p_bytes, n)
        # the same bytes as DDP's one all-reduce of the gradients
        assert log.sent() == D.bytes_per_step("ddp", p_bytes, n)


@pytest.mark.parametrize("n", [2, 4])
def test_zero2_reduces_every_micro_batch_unless_no_sync(runs, n):
    p_bytes = B * n_params(runs)
    rec = record(runs, n)
    for rank in rec["zero2"]:
        buckets = rank["buckets"]
        assert len(buckets) > 3 and B * sum(buckets) == p_bytes  # no padding here
        assert sum(calls(rank, "reduce_scatter")) == ACCUM * p_bytes
        assert len(calls(rank, "reduce_scatter")) == ACCUM * len(buckets)
        assert calls(rank, "all_gather") == [B * s for s in buckets]
    for rank in rec["zero2_no_sync"]:  # the first micro-batch kept whole gradients
        assert sum(calls(rank, "reduce_scatter")) == p_bytes
        assert sum(calls(rank, "all_gather")) == p_bytes


@pytest.mark.parametrize("n", [2, 4])
def test_pytorch_zero_sends_half_as_much_again(runs, n):
    """ZeroRedundancyOptimizer leaves the gradients to DDP's all-reduce and
    broadcasts every parameter from its owner: 1.5 x ZeRO-1 (DeepSpeed's ZeRO-1/2
    all-reduce too, by default)."""
    p_bytes = B * n_params(runs)
    for rank in record(runs, n)["torch_zero"]:
        assert sum(calls(rank, "all_reduce")) == p_bytes
        assert sum(calls(rank, "broadcast")) == p_bytes
        log = D.CollectiveLog(n, rank["calls"])
        assert log.sent() == pytest.approx(1.5 * D.bytes_per_step("zero1", p_bytes, n))


def test_reduce_is_counted_and_n_reduces_cost_one_reduce_scatter(runs):
    for n in (2, 4):
        rec = record(runs, n)["reduce"]
        assert rec["calls"] == [["reduce", 800]] * n
        assert rec["sent"] == D.RING_FACTOR["reduce_scatter"](n) * n * 800


# ------------------------------------------------------------------ memory


def held(runs, n: int, variant: str) -> list[dict]:
    """Each rank's record (N = 1: the run on a process group of one)."""
    if n == 1:
        return [record(runs, 2)[f"{variant}_one_process"]]
    return record(runs, n)[variant]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("variant", ["zero1", "zero2"])
def test_memory_per_rank_follows_the_zero_formulas(runs, n, variant):
    p = n_params(runs)
    assert p % 4 == 0  # every rank owns exactly P / N elements
    for rank in held(runs, n, variant):
        got = rank["held"]  # after the last step's reduction
        assert got["params"] == B * p
        assert got["optimizer"] == 2 * B * p // n + 4 * rank["pieces"]
        whole = B * p if variant == "zero1" else 0
        assert got["grads"] == whole + B * p // n
        assert rank["held_after_zero_grad"]["grads"] == 0


@pytest.mark.parametrize("n", [1, 2, 4])
def test_zero2_never_holds_the_whole_gradient_in_backward(runs, n):
    p = n_params(runs)
    for rank in held(runs, n, "zero1"):
        assert rank["grads_peak"] == B * p  # backward leaves every .grad whole
    for rank in held(runs, n, "zero2"):
        bucket = max(rank["buckets"])
        # the share, the bucket being filled, the bucket in flight and its result
        assert rank["grads_peak"] <= B * (p // n + 2 * bucket + bucket // n)
        if n > 1:
            assert rank["grads_peak"] < B * p


def test_our_partition_is_even_where_pytorch_s_is_not(runs):
    """Whole parameters cannot be split evenly over 4 ranks; flat chunks can."""
    p = n_params(runs)
    ours = [r["held"]["optimizer"] - 4 * r["pieces"] for r in held(runs, 4, "zero1")]
    assert ours == [2 * B * p // 4] * 4
    theirs = [r["held"]["optimizer"] for r in held(runs, 4, "torch_zero")]
    assert max(theirs) - min(theirs) > 1000  # measured 114,696 vs 109,604 bytes


def test_misuse_is_refused_with_a_clear_message(runs):
    errors = record(runs, 2)["errors"]
    assert "no gradients yet: 0 of 28 parameters" in errors["step_first"]
    assert "stage must be 1 or 2" in errors["stage3"]
    assert "no_sync()" in errors["no_sync_left"]
