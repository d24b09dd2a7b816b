"""shared.distributed in one process: the tensor-parallel split is exact, pipeline
stages chain to the whole model, collectives are counted, formulas and the launcher.

The multi-process checks (every strategy equal to one process) are in
``chapters/06_distributed_training/test_train_distributed.py``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from shared import distributed as D
from shared.model import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context_length=16, n_layer=3, n_head=4, n_embd=32)
    return GPT(GPTConfig(**(cfg | kw))).double().eval()


def test_qkv_rows_give_each_rank_its_own_heads():
    order = D.qkv_rows_by_rank(n_embd=8, n_head=4, tp=2)
    assert sorted(order.tolist()) == list(range(24))  # a permutation of 3 * 8 rows
    # rank 0's chunk: q, k, v rows of heads 0-1 (rows 0-3 of each 8-row block)
    assert order[:12].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="divisible"):
        D.qkv_rows_by_rank(n_embd=12, n_head=3, tp=2)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_tensor_parallel_split_sums_to_the_full_block(tp, pos):
    """Megatron's split, simulated: each rank's column slice of c_attn/c_fc and row
    slice of c_proj, run with its local head count; the partial outputs add up."""
    model = tiny(pos_encoding=pos)
    block = model.transformer.h[0]
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    full_attn, full_mlp = block.attn(x), block.mlp(x)

    D.permute_qkv(model, tp)
    attn, mlp = block.attn, block.mlp
    w_qkv, b_qkv = attn.c_attn.weight.chunk(tp), attn.c_attn.bias.chunk(tp)
    w_o = attn.c_proj.weight.chunk(tp, dim=1)
    partial_attn = torch.zeros_like(x)
    hd = attn.head_dim
    for r in range(tp):
        q, k, v = F.linear(x, w_qkv[r], b_qkv[r]).split(32 // tp, dim=2)
        q, k, v = (z.view(2, 16, 4 // tp, hd).transpose(1, 2) for z in (q, k, v))
        partial_attn += F.linear(_heads(attn, q, k, v), w_o[r])
    torch.testing.assert_close(partial_attn + attn.c_proj.bias, full_attn)
    w_fc, b_fc = mlp.c_fc.weight.chunk(tp), mlp.c_fc.bias.chunk(tp)
    w_p = mlp.c_proj.weight.chunk(tp, dim=1)
    partial_mlp = sum(
        F.linear(mlp.gelu(F.linear(x, w_fc[r], b_fc[r])), w_p[r]) for r in range(tp)
    )
    torch.testing.assert_close(partial_mlp + mlp.c_proj.bias, full_mlp)
    D.permute_qkv(model, tp, inverse=True)
    torch.testing.assert_close(block.attn(x), full_attn)  # the order is restored


def _heads(attn, q, k, v):
    from shared.attention import apply_rope, causal_attention

    if attn.rope:
        q = apply_rope(q, attn.rope_cos, attn.rope_sin)
        k = apply_rope(k, attn.rope_cos, attn.rope_sin)
    out = causal_attention(q, k, v)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_pipeline_stages_chain_to_the_whole_model(stages, pos):
    model = tiny(pos_encoding=pos)
    idx = torch.randint(0, 50, (2, 16))
    x = idx
    parts = [D.GPTStage(model, a, b) for a, b in D.split_layers(3, stages)]
    for part in parts:
        x = part(x)
    torch.testing.assert_close(x, model(idx))
    names = [n for part in parts for n, _ in part.named_parameters()]
    assert sorted(names) == sorted(model.state_dict())  # GPT names, head copy included
    assert parts[-1].lm_head.weight is not model.lm_head.weight  # its own copy


def test_split_layers_is_balanced_and_checked():
    assert D.split_layers(4, 2) == [(0, 2), (2, 4)]
    assert D.split_layers(5, 3) == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(ValueError):
        D.split_layers(2, 3)


def test_ring_formulas():
    assert D.RING_FACTOR["all_reduce"](2) == 1.0
    assert D.RING_FACTOR["all_reduce"](8) == pytest.approx(1.75)
    assert D.bytes_per_step("ddp", 1000, 2) == 1000
    assert D.bytes_per_step("zero2", 1000, 4) == pytest.approx(1500)
    assert D.bytes_per_step("fsdp2", 1000, 2) == 1500  # gather, gather, scatter
    with pytest.raises(ValueError):
        D.bytes_per_step("tp", 1000, 2)


def test_count_collectives_sees_calls_and_sizes(world_of_one):
    x = torch.ones(10, dtype=torch.float64)
    out = torch.empty(10, dtype=torch.float64)
    with D.count_collectives(world_size=2) as log:
        dist.all_reduce(x)
        dist.all_gather_single(out, x)
        dist.broadcast(x, 0)
    assert [k for k, _ in log.calls] == ["all_reduce", "all_gather", "broadcast"]
    assert log.payload() == 3 * 80
    assert log.sent() == 80 * (1.0 + 0.5 + 0.5)  # ring factors for 2 ranks
    assert log.summary()["all_reduce"] == {"calls": 1, "bytes": 80}


def test_manual_allreduce_in_a_world_of_one_keeps_gradients(world_of_one):
    model = tiny()
    model(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8)))[1].backward()
    before = [p.grad.clone() for p in model.parameters()]
    D.allreduce_gradients(model, world_size=1)
    for a, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_clip_gradients_equals_torch(world_of_one):
    a, b = tiny(), tiny()
    idx = torch.randint(0, 50, (2, 16))
    for m in (a, b):
        m(idx, idx)[1].mul(100).backward()
    n1 = torch.nn.utils.clip_grad_norm_(list(a.parameters()), 0.5)
    n2 = D.clip_gradients(list(b.parameters()), 0.5)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_gradients_takes_a_generator_as_torch_does():
    """``model.parameters()`` is a generator: the norm pass must not use it up."""
    a, b = tiny(), tiny()
    idx = torch.randint(0, 50, (2, 16))
    for m in (a, b):
        m(idx, idx)[1].mul(100).backward()
    n1 = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
    n2 = D.clip_gradients(b.parameters(), 0.5)
    assert n2 > 1.0  # large enough that clipping has to act
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    clipped = torch.stack([p.grad.norm() for p in b.parameters()]).norm()
    assert clipped.item() == pytest.approx(0.5, rel=1e-5)  # clipped to max_norm


def test_rank_batches_deal_out_the_global_batch(tmp_path):
    ids = torch.arange(2000)
    one = D.rank_batches(ids, 10, micro_batch=4, num_replicas=1, rank=0, seed=3)
    two = [D.rank_batches(ids, 10, micro_batch=2, num_replicas=2, rank=r, seed=3)
           for r in range(2)]  # fmt: skip
    for _ in range(30):  # past the first epoch (199 windows / 4 per batch)
        x, _ = next(one)
        parts = torch.cat([next(g)[0] for g in two])
        assert sorted(x[:, 0].tolist()) == sorted(parts[:, 0].tolist())


def test_launch_streams_and_reports_failure(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import os\nprint('rank', os.environ.get('RANK', '-'))\n")
    lines = D.launch(ok, nproc=0, echo=None)
    assert lines == ["rank -"]
    bad = tmp_path / "bad.py"
    bad.write_text("print('before'); raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match=r"exit 3\):\nbefore"):
        D.launch(bad, nproc=0, echo=None)
    cmd = D.torchrun_command("x.py", ["--a"], nproc=2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[-2:] == ["x.py", "--a"]


def test_model_state_bytes_reproduce_the_zero_paper():
    """ZeRO (Rajbhandari et al. 2020), Figure 1: 7.5B parameters on 64 devices."""
    gb = {s: D.model_state_bytes(7.5e9, 64, s)["total"] / 1e9
          for s in ("ddp", "zero1", "zero2", "zero3")}  # fmt: skip
    assert gb["ddp"] == pytest.approx(120)
    assert gb["zero1"] == pytest.approx(31.4, abs=0.05)
    assert gb["zero2"] == pytest.approx(16.6, abs=0.05)
    assert gb["zero3"] == pytest.approx(1.9, abs=0.05)
    with pytest.raises(ValueError):
        D.model_state_bytes(1, 2, "tp")


def test_launch_stops_a_hung_script(tmp_path):
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")  # silent: no line to wake on
    with pytest.raises(TimeoutError, match="stopped"):
        D.launch(hang, nproc=0, echo=None, timeout=1)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (reaped or not, it no longer runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # Linux: the state follows the command name
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


def test_launch_timeout_stops_the_workers_too(tmp_path):
    """torchrun starts each worker in a session of its own: killing torchrun alone
    left them running, holding the log pipe open, and launch() waited for them."""
    sleeper = tmp_path / "sleeper.py"
    # one write(2) per line: the workers share the pipe, and unbuffered print()
    # writes "worker" and the pid separately, which can interleave
    sleeper.write_text("import os, time\n"
                       "os.write(1, f'worker {os.getpid()}\\n'.encode())\n"
                       "time.sleep(60)\n")  # fmt: skip
    lines: list[str] = []
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="stopped"):
        D.launch(sleeper, nproc=2, echo=lines.append, timeout=8)
    assert time.perf_counter() - t0 < 25  # not the workers' 60 s
    pids = [int(ln.split()[-1]) for ln in lines if ln.startswith("worker ")]
    assert len(pids) == 2, lines
    time.sleep(0.5)  # SIGKILL is delivered at once; give the kernel a moment
    assert not [pid for pid in pids if alive(pid)]


FROZEN = """
import os, signal, torch, torch.distributed as dist
from shared import distributed as D
env = D.init_distributed("cpu", timeout=5)
x = torch.ones(1)
dist.all_reduce(x)  # both ranks are up
if env.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # neither crashes nor exits: it stops
dist.all_reduce(x)  # rank 0 waits for rank 1
"""


def test_a_frozen_rank_fails_the_others_after_the_group_timeout(tmp_path):
    """Rank 1 stops itself (SIGSTOP); rank 0's collective raises after 5 s instead of
    waiting gloo's default 30 minutes. (Under torchrun the job then ends: it gives
    the stopped rank 30 s to answer SIGTERM, then kills it.)"""
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN)
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(D.free_port()),
                        "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    ranks = [
        subprocess.Popen([sys.executable, script], env=env | {"RANK": str(r)}, **out)
        for r in range(2)
    ]
    try:
        log, _ = ranks[0].communicate(timeout=60)  # without a timeout: 30 minutes
    finally:
        for rank in ranks:  # SIGKILL ends a stopped process too
            rank.kill()
            rank.wait()
    assert ranks[0].returncode != 0
    assert "Timed out waiting 5000ms" in log, log[-2000:]
