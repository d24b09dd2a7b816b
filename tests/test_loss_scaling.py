"""Loss scaling by hand makes GradScaler's decisions: the same scales, the same
skipped steps, the same parameters."""

from __future__ import annotations

import pytest
import torch

from shared.loss_scaling import LossScaler


def run(scaler_cls, overflow_steps, steps=12, clip=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_cls()
    g = torch.Generator().manual_seed(1)
    trace = []
    for step in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step in overflow_steps:  # as if float16 had overflowed in backward
            model.weight.grad[0, 0] = float("inf" if step % 2 else "nan")
        scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = model.weight.detach().clone()
        scaler.step(opt)
        stepped = not torch.equal(before, model.weight)
        scaler.update()
        trace.append((scaler.get_scale(), stepped))
    return trace, [p.detach() for p in model.parameters()]


def torch_scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)


def course_scaler():
    return LossScaler(init_scale=2.0**10, growth_interval=3)


@pytest.mark.parametrize("overflow", [(), (0,), (2, 3, 7), (4, 5, 6, 7, 8)])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_same_decisions_as_grad_scaler(overflow, clip):
    ours, our_params = run(course_scaler, overflow, clip=clip)
    theirs, their_params = run(torch_scaler, overflow, clip=clip)
    assert ours == theirs
    for a, b in zip(our_params, their_params, strict=True):
        assert torch.equal(a, b)
    skipped = [i for i, (_, stepped) in enumerate(ours) if not stepped]
    assert skipped == list(overflow)


def test_scale_halves_on_overflow_and_grows_after_clean_steps():
    trace, _ = run(course_scaler, overflow_steps=(1,), steps=8)
    scales = [s for s, _ in trace]
    # step 0 clean; 1 overflow: halve; 2, 3, 4 clean: grow after the third
    assert scales == [1024, 512, 512, 512, 1024, 1024, 1024, 2048]


def test_unscale_twice_is_an_error():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler()
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        scaler.unscale_(opt)
