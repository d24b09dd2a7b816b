"""Tests of the multi-node launch recipes in ``launch/`` (no cluster needed).

* the Kubernetes manifest passes ``launch/validate_k8s.sh`` (schemas of several
  Kubernetes versions + consistency checks) and broken copies of it are rejected;
* the pods' exact shell command from the manifest forms a 2-"node" job on this machine;
* ``launch/two_agents.sh`` (two torchrun agents = the multi-node command) trains;
* ``launch/run_slurm_demo.sh`` on a local Slurm: only with LLM_COURSE_SLURM_TEST=1
  (it needs root, apt and starts daemons).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import distributed as D

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAUNCH = HERE / "launch"
TRAIN = HERE / "train_distributed.py"
BIN = Path(sys.executable).parent  # the running venv's bin/ (torchrun)

# A stand-in worker: rendezvous, one all-reduce, one file per rank.
STANDIN = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(r + 1)])
dist.all_reduce(t)
assert t.item() == w * (w + 1) / 2, t
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, f"rank{r}.txt"), "w").write(f"{w} {t.item()}")
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env["OMP_NUM_THREADS"] = "1"
    env["TORCHRUN"] = (
        str(BIN / "torchrun") if (BIN / "torchrun").exists() else "torchrun"
    )
    return env


def test_k8s_manifest_validates_and_broken_copies_fail():
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.skip(
            "kubernetes-validate is not installed (pip install kubernetes-validate)"
        )
    res = subprocess.run(
        ["bash", str(LAUNCH / "validate_k8s.sh"), "--self-test"],
        env=dict(_env(), PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken copies are rejected" in res.stdout


def test_k8s_pod_command_runs_as_two_nodes(tmp_path):
    """Run the manifest's container command twice (JOB_COMPLETION_INDEX 0 and 1)."""
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((LAUNCH / "k8s" / "train-job.yaml").read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bash", "-c"]
    script = container["args"][0]
    # Swap what only exists in the cluster: the worker program and the output volume.
    assert "chapters/06_distributed_training/train_distributed.py" in script
    (tmp_path / "worker.py").write_text(STANDIN)
    script = script.replace(
        "chapters/06_distributed_training/train_distributed.py",
        str(tmp_path / "worker.py"),
    )
    script = script.replace("--out /output", f"--out {tmp_path / 'output'}")
    env = dict(_env(), **{k: str(v) for k, v in cm["data"].items()})
    env.update(
        {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    )
    assert (
        env["RDZV_HOST"]
        == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    )
    env.update(RDZV_HOST="localhost", RDZV_PORT=str(D.free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            ["bash", "-c", script],
            env=dict(env, JOB_COMPLETION_INDEX=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(int(env["NNODES"]))
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
    world = int(env["NNODES"]) * int(env["NPROC_PER_NODE"])
    for r in range(world):
        assert (
            tmp_path / "output" / f"rank{r}.txt"
        ).read_text() == f"{world} {world * (world + 1) / 2}"


def test_two_agents_train(tmp_path):
    """two_agents.sh: two torchrun agents (--nnodes 2) rendezvous and train with DDP."""
    env = dict(_env(), LOG_DIR=str(tmp_path / "logs"), TIMEOUT="240")
    if TRAIN.exists():
        args = [
            "--strategy",
            "ddp",
            "--steps",
            "2",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "out"),
        ]
    else:  # the real script is not there: the stand-in still proves the launch
        (tmp_path / "worker.py").write_text(STANDIN)
        env["SCRIPT"] = str(tmp_path / "worker.py")
        args = ["--out", str(tmp_path / "out")]
    res = subprocess.run(
        ["bash", str(LAUNCH / "two_agents.sh"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "both nodes finished OK" in res.stdout
    assert (tmp_path / "logs" / "node0.log").exists() and (
        tmp_path / "logs" / "node1.log"
    ).exists()
    if TRAIN.exists():
        assert (tmp_path / "out" / "final.safetensors").exists()
        record = json.loads((tmp_path / "out" / "losses.json").read_text())
        assert record  # the training record written by rank 0
    else:
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
            "rank0.txt",
            "rank1.txt",
        ]


def test_two_agents_fails_when_a_node_fails(tmp_path):
    (tmp_path / "bad.py").write_text("import sys; sys.exit(3)\n")
    env = dict(
        _env(),
        LOG_DIR=str(tmp_path / "logs"),
        TIMEOUT="120",
        SCRIPT=str(tmp_path / "bad.py"),
    )
    res = subprocess.run(
        ["bash", str(LAUNCH / "two_agents.sh"), "--x"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode != 0
    assert "FAILED" in res.stderr


@pytest.mark.skipif(
    os.environ.get("LLM_COURSE_SLURM_TEST") != "1",
    reason="set LLM_COURSE_SLURM_TEST=1 to start a local Slurm (root, apt)",
)
def test_slurm_demo(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root")
    env = dict(_env(), STEPS="2", JOB_TIMEOUT="240")
    if not TRAIN.exists():
        (tmp_path / "worker.py").write_text(STANDIN)
        env["TRAIN_SCRIPT"] = str(tmp_path / "worker.py")
    res = subprocess.run(
        ["bash", str(LAUNCH / "run_slurm_demo.sh"), str(tmp_path / "slurm")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "COMPLETED" in res.stdout
