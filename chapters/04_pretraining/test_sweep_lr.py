"""sweep_lr.py: the runs it records, and the divergence it flags."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_lr import is_diverged, main  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() sets one thread


def test_a_tiny_sweep_flags_the_rate_that_blows_up(tmp_path):
    args = ["--lrs", "1e-3", "10", "--seeds", "0", "1", "--steps", "8", "--bin", "2"]
    main([*args, "--eval-tokens", "1024", "--results", str(tmp_path)])
    out = json.loads((tmp_path / "lr_sweep.json").read_text())  # strict JSON: no NaN
    assert out["lrs"] == [1e-3, 10.0] and out["seeds"] == [0, 1]
    assert [(r["lr"], r["seed"]) for r in out["runs"]] == [
        (1e-3, 0), (1e-3, 1), (10.0, 0), (10.0, 1)]  # fmt: skip
    small, large = out["runs"][:2], out["runs"][2:]
    for r in small:  # learns a little and stays below a uniform guess
        assert not r["diverged"]
        assert len(r["train_loss_binned"]) == 4
        assert max(r["train_loss_binned"][1:]) < out["ln_V"] == math.log(1024)
        assert 3.0 < r["final_val_bpc"] < 5.0
    assert small[0]["train_loss_binned"] != small[1]["train_loss_binned"]  # seeds
    for r in large:
        assert r["diverged"]
        assert r["max_train_loss_after_first_bin"] is None or (
            r["max_train_loss_after_first_bin"] > out["ln_V"]
        )
    assert out["torch_threads"] == 1
    assert out["total_cpu_s"] > 0 and "machine" in out


def test_diverged_means_non_finite_or_worse_than_a_uniform_guess():
    ln_v = math.log(1024)
    assert not is_diverged([6.95, 6.0, 5.0, 4.5], ln_v, skip=1)  # step 0 is ~ln V
    assert is_diverged([6.95, 6.0, 7.5, 5.0], ln_v, skip=1)  # rose above ln V
    assert is_diverged([6.95, 6.0, float("nan")], ln_v, skip=1)
    assert is_diverged([float("inf"), 6.0], ln_v, skip=1)  # even in the skipped part
    assert not is_diverged([7.5, 5.0], ln_v, skip=1)
