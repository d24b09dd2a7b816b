"""Tests of shared/train.py with a tiny stand-in language model (fast, CPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.train import (
    BatchSampler,
    TrainConfig,
    bits_per_char,
    configure_optimizer,
    estimate_loss,
    evaluate_split,
    load_checkpoint,
    lr_at,
    parameter_groups,
    save_checkpoint,
    train,
)

V, T = 37, 16


@dataclass
class TinyConfig:
    vocab_size: int = V
    context_length: int = T
    n_embd: int = 24
    dropout: float = 0.1


class TinyLM(nn.Module):
    """Embedding -> causal mixing MLP -> LayerNorm -> tied head, with dropout (so the
    global RNG matters for exact resume)."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.mix = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied, like GPT-2
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        h = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        # causal running mean: position t sees tokens 0..t only
        ctx = h.cumsum(1) / torch.arange(1, t + 1, device=idx.device)[None, :, None]
        h = h + ctx
        h = h + self.drop(F.gelu(self.mix(h)))
        logits = self.head(self.ln(h))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def _data(n: int = 3000, seed: int = 0) -> np.ndarray:
    # a learnable stream: mostly "repeat the previous token", sometimes a random one
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    for i in range(1, n):
        out[i] = out[i - 1] if rng.random() < 0.8 else rng.integers(V)
    return out


def _model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyConfig(**kw))


def _cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3,
        eval_interval=5, eval_iters=2, log_interval=5, seed=7,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_fresh_model_loss_is_about_ln_vocab():
    model = _model()
    uniform = np.random.default_rng(0).integers(V, size=3000)
    losses = estimate_loss(model, {"val": uniform}, eval_iters=4, batch_size=8)
    assert abs(losses["val"] - math.log(V)) < 0.1


def test_steps_on_a_fixed_batch_reduce_the_loss():
    model = _model()
    opt = configure_optimizer(model, _cfg(lr=1e-2))
    x, y = BatchSampler(_data(), 8, T, seed=1).next()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_schedule_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way: the mean
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # stays at min_lr afterwards
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay


def test_parameter_groups_split_matrices_from_vectors():
    model = _model()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied once


def test_gradient_clipping_caps_the_norm():
    model = _model()
    x, y = BatchSampler(_data(), 8, T, seed=1).next()
    _, loss = model(x, y)
    (loss * 1000).backward()  # a huge gradient
    before = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    after = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 10
    assert after == pytest.approx(1.0, rel=1e-4)


def test_train_logs_and_learns(tmp_path):
    model = _model()
    cfg = _cfg(max_steps=30, lr=1e-2)
    hist = train(model, _data(), _data(seed=1), cfg, progress=False)
    assert [r["step"] for r in hist["eval"]] == [0, 5, 10, 15, 20, 25, 30]
    assert hist["eval"][-1]["val_loss"] < hist["eval"][0]["val_loss"] - 0.3
    assert len(hist["train"]) == 30 and "tokens_per_s" in hist["train"][4]
    assert hist["train"][-1]["tokens"] == 30 * 4 * T


def test_grad_accumulation_matches_one_big_batch():
    # 2 micro-batches of 4 == one batch of 8 when the sampler draws the same windows
    data = _data()
    m1, m2 = _model(), _model()
    o1 = configure_optimizer(m1, _cfg())
    o2 = configure_optimizer(m2, _cfg())
    x, y = BatchSampler(data, 8, T, seed=3).next()
    m1.eval(), m2.eval()  # no dropout: compare the gradients only
    _, loss = m1(x, y)
    loss.backward()
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        _, loss = m2(xs, ys)
        (loss / 2).backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad)
    o1.step(), o2.step()


def test_bf16_autocast_switch_runs():
    model = _model()
    hist = train(model, _data(), _data(seed=1), _cfg(max_steps=4, dtype="bfloat16"),
                 progress=False)  # fmt: skip
    assert math.isfinite(hist["train"][-1]["loss"])


def test_resume_is_bit_identical(tmp_path):
    cfg = _cfg(max_steps=20, grad_accum_steps=2)
    full = train(_model(), _data(), _data(seed=1), cfg, progress=False)
    ckpt = tmp_path / "ckpt"
    first = train(_model(), _data(), _data(seed=1), cfg, checkpoint_dir=ckpt,
                  stop_at=12, progress=False)  # fmt: skip
    assert len(first["train"]) == 12
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    second = train(_model(seed=5), _data(), _data(seed=1), cfg, checkpoint_dir=ckpt,
                   resume=True, progress=False)  # fmt: skip
    losses_full = [r["loss"] for r in full["train"]]
    losses_resumed = [r["loss"] for r in second["train"]]
    assert losses_resumed == losses_full  # exact float equality, every step
    assert [e["val_loss"] for e in second["eval"]] == [
        e["val_loss"] for e in full["eval"]
    ]


def test_checkpoint_round_trip_restores_weights_and_sampler(tmp_path):
    model = _model()
    opt = configure_optimizer(model, _cfg())
    sampler = BatchSampler(_data(), 4, T, seed=3)
    sampler.next()
    save_checkpoint(tmp_path, model, opt, 1, train_config=_cfg(), sampler=sampler)
    expected = sampler.next()
    other = _model(seed=1)
    opt2 = configure_optimizer(other, _cfg())
    sampler2 = BatchSampler(_data(), 4, T, seed=99)
    meta = load_checkpoint(tmp_path, other, opt2, sampler=sampler2)
    assert meta["step"] == 1 and TrainConfig.from_dict(meta["train_config"]) == _cfg()
    for a, b in zip(
        model.state_dict().values(), other.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    got = sampler2.next()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_loading_a_different_config_fails_clearly(tmp_path):
    save_checkpoint(tmp_path, _model(), None, 0)
    with pytest.raises(ValueError, match=r"different model config.*n_embd"):
        load_checkpoint(tmp_path, _model(n_embd=32))


def test_pickle_payload_is_refused(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model, None, 0)

    class Evil:
        def __reduce__(self):
            return (exec, ("import builtins; builtins._pwned = True",))

    torch.save({"torch_rng": torch.get_rng_state(), "x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_checkpoint(tmp_path, model)
    import builtins

    assert not hasattr(builtins, "_pwned")


def test_weights_are_safetensors(tmp_path):
    from safetensors import safe_open

    save_checkpoint(tmp_path, _model(), None, 0)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "wte.weight" in f.keys() or "head.weight" in f.keys()


def test_evaluate_split_and_bits_per_char():
    model = _model()
    data = _data(500)
    full = evaluate_split(model, data, batch_size=8)
    # reference: the same windows through torch's cross-entropy directly
    n = (len(data) - 1) // T
    x = torch.as_tensor(data[: n * T]).view(n, T)
    y = torch.as_tensor(data[1 : n * T + 1]).view(n, T)
    model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).item()
    assert full == pytest.approx(ref, rel=1e-5)
    # 1 nat/token at 2 chars/token is 0.5 nats/char = 0.7213 bits/char
    assert bits_per_char(1.0, 100, 200) == pytest.approx(0.5 / math.log(2))
