"""``FSDPByHand`` (``shared/distributed/fsdp.py``) on 2 and 4 gloo processes.

One launch per world size (both at once) runs ``check_fsdp.py``: two tiny GPTs (one
whose rows need padding) train 3 float64 steps with gradient accumulation and
clipping, by hand, with FSDP2 and in one process. The tests compare the final
parameters and gradient norms, the collectives of one step with FSDP2's call for
call, the whole parameters alive at the peak, and what each rank holds.
"""

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shared import distributed as D

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "check_fsdp.py"
WORLDS = (2, 4)
CONFIGS = ("even", "odd")
ACCUM, N_LAYER = 2, 2  # as in check_fsdp.py
CASES = [(n, c) for n in WORLDS for c in CONFIGS]


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("fsdp")
    with ThreadPoolExecutor(len(WORLDS)) as pool:
        futures = {
            n: pool.submit(
                D.launch,
                SCRIPT,
                ["--out", base / str(n)],
                nproc=n,
                echo=None,
                timeout=300,
            )  # fmt: skip
            for n in WORLDS
        }
    return {n: (base / str(n), f.exception()) for n, f in futures.items()}


def out(launches, world: int) -> Path:
    folder, error = launches[world]
    if error is not None:  # one world size failing fails only its own tests
        pytest.fail(f"the {world}-process launch failed: {error}", pytrace=False)
    return folder


def results(launches, world: int) -> dict:
    return json.loads((out(launches, world) / "results.json").read_text())


def max_diff(launches, world: int, a: str, b: str) -> float:
    pa = load_file(str(out(launches, world) / f"{a}.safetensors"))
    pb = load_file(str(out(launches, world) / f"{b}.safetensors"))
    assert sorted(pa) == sorted(pb)  # GPT names, the tied matrix once
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


@pytest.mark.parametrize(("world", "config"), CASES)
def test_final_parameters_equal_one_process_and_fsdp2(launches, world, config):
    assert max_diff(launches, world, f"{config}_ours", f"{config}_single") < 1e-12
    assert max_diff(launches, world, f"{config}_ours", f"{config}_fsdp2") < 1e-12


@pytest.mark.parametrize(("world", "config"), CASES)
def test_gradient_norms_equal_one_process_and_clipping_clips(launches, world, config):
    r = results(launches, world)
    ours, single = r[f"{config}_ours"]["norms"][:3], r[f"{config}_single"]["norms"]
    assert ours == pytest.approx(single, rel=1e-12)  # averaged over ranks, not summed
    assert min(ours) > 5 * r["max_norm"]  # every step's gradients were scaled down


@pytest.mark.parametrize(("world", "config"), CASES)
def test_collectives_equal_fsdp2_call_for_call(launches, world, config):
    r = results(launches, world)
    ours, fsdp2 = r[f"{config}_ours"], r[f"{config}_fsdp2"]
    root, *blocks = ours["padded_bytes"]
    for key, micro in (("comm", ACCUM), ("comm_accum1", 1)):
        assert ours[key] == fsdp2[key]  # kinds, calls and bytes
        # per micro-batch: forward gathers the root and every block, backward the
        # blocks again (the root stays gathered); one reduce-scatter per unit a step
        assert ours[key]["all_gather"] == {
            "calls": micro * (1 + 2 * N_LAYER),
            "bytes": micro * (root + 2 * sum(blocks)),
        }
        assert ours[key]["reduce_scatter"] == {"calls": 1 + N_LAYER,
                                               "bytes": root + sum(blocks)}  # fmt: skip
        assert [rank[key] for rank in r["per_rank"][config]] == [ours[key]] * world
    assert ours["clip_comm"] == {"all_reduce": {"calls": 1, "bytes": 8}}


@pytest.mark.parametrize("world", WORLDS)
def test_traffic_is_the_ring_formula_less_the_root_backward_gather(launches, world):
    r = results(launches, world)["even_ours"]
    assert r["padded_bytes"] == [r["root_bytes"], *r["block_bytes"]]  # no padding
    formula = D.bytes_per_step("fsdp2", r["model_bytes"], world)  # gathers all twice
    root_again = D.RING_FACTOR["all_gather"](world) * r["root_bytes"]
    assert r["sent_accum1"] == pytest.approx(formula - root_again, abs=1e-6)


@pytest.mark.parametrize(("world", "config"), CASES)
def test_peak_whole_parameters_are_the_root_and_one_block(launches, world, config):
    r = results(launches, world)
    ours = r[f"{config}_ours"]
    root, blocks = ours["root_bytes"], ours["block_bytes"]
    peaks = [rank["peak_param_bytes"] for rank in r["per_rank"][config]]
    assert peaks == [root + max(blocks)] * world  # never two blocks at once
    assert ours["alive_after_forward"] == root  # blocks freed, the root kept
    assert ours["alive_before_step"] == ours["alive_after_backward"] == 0
    shards = [rank["shard_bytes"] for rank in r["per_rank"][config]]
    assert sum(shards) == ours["model_bytes"]  # every element on exactly one rank
    chunks = [math.ceil(s[0] / world) * math.prod(s[1:]) for s in ours["gpt_shapes"]]
    assert shards[0] == 8 * sum(chunks)  # rank 0: a full chunk of every parameter


@pytest.mark.parametrize(("world", "config"), CASES)
def test_shards_keep_names_dims_groups_and_the_tie(launches, world, config):
    r = results(launches, world)
    ours = r[f"{config}_ours"]
    assert ours["names"] == ours["gpt_names"] and ours["tied"]
    assert ours["group_sizes"] == ours["gpt_group_sizes"]  # decay for >= 2-D
    per_rank = [rank["shapes"] for rank in r["per_rank"][config]]
    for i, whole in enumerate(ours["gpt_shapes"]):
        parts = [shapes[i] for shapes in per_rank]
        assert all(p[1:] == whole[1:] for p in parts)  # same dims, split by rows
        assert sum(p[0] for p in parts) == whole[0]
        assert max(p[0] for p in parts) == math.ceil(whole[0] / world)
    assert ours["start_diff"] == 0.0  # sharded, gathered back: exactly the model
    assert ours["no_grad_logits_diff"] < 1e-12  # each unit gathered, run and freed
    assert ours["no_grad_left"] == 0
