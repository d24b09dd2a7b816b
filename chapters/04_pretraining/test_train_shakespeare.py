"""train_shakespeare.py: a short run works, and running it again keeps its records."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_shakespeare  # noqa: E402
from train_shakespeare import main  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny workloads: a second thread only adds overhead
    yield
    torch.set_num_threads(threads)


def test_short_run_then_rerun_keeps_samples_and_attention_snapshots(tmp_path):
    args = ["laptop", "--steps", "3", "--out", str(tmp_path / "model")]
    args += ["--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    main(args)  # 3 steps: shorter than log_interval (10) and eval_interval (100)
    log_file = tmp_path / "results" / "laptop_run.json"
    maps_file = tmp_path / "results" / "laptop_attention.safetensors"
    first = json.loads(log_file.read_text())
    assert sorted(first["samples"]) == ["0", "3"]
    assert sorted(load_file(str(maps_file))) == ["step_0", "step_3"]
    info = json.loads((tmp_path / "model" / "config.json").read_text())
    assert info["results"]["tokens_per_s_median"] > 0

    main(args)  # the run is finished: this resumes at step 3 and ships it again
    again = json.loads(log_file.read_text())
    assert again["samples"] == first["samples"]
    assert sorted(load_file(str(maps_file))) == ["step_0", "step_3"]
    assert again["history"]["train"] == first["history"]["train"]


def test_a_trial_run_does_not_replace_the_shipped_model_or_results(
    tmp_path, monkeypatch, capsys
):
    shipped, results = tmp_path / "shipped", tmp_path / "results"
    for folder, name in [(shipped, "config.json"), (results, "laptop_run.json")]:
        folder.mkdir()
        (folder / name).write_text("the full run's file")
    monkeypatch.setitem(train_shakespeare.MODEL_DIRS, "laptop", shipped)
    monkeypatch.setattr(train_shakespeare, "RESULTS", results)
    args = ["laptop", "--steps", "2", "--runs", str(tmp_path / "runs")]
    main(args)
    printed = capsys.readouterr().out
    assert f"the model is not shipped to {shipped} (--ship" in printed
    assert f"the chapter's results in {results} are kept" in printed
    assert [p.name for p in shipped.iterdir()] == ["config.json"]
    assert [p.name for p in results.iterdir()] == ["laptop_run.json"]
    assert (results / "laptop_run.json").read_text() == "the full run's file"

    main([*args, "--ship"])  # asked for: resumes the finished run and ships it
    info = json.loads((shipped / "config.json").read_text())
    assert info["train_config"]["max_steps"] == 2 and "weights_sha256" in info
    assert sorted(p.name for p in results.iterdir()) == [
        "laptop_attention.safetensors", "laptop_run.json"]  # fmt: skip
