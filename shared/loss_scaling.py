"""Dynamic loss scaling by hand, for float16 training.

float16 stores numbers down to about 6e-8; gradients of a language model are often
smaller and become 0 ("underflow"). Multiplying the loss by a large factor S scales
every gradient by S (backward is linear), which lifts them into range; dividing them
by S again before the optimizer step gives the true gradients. If S was too large,
some gradient overflows to inf: that step is skipped and S halved. After
``growth_interval`` steps in a row without overflow, S doubles, so it stays near the
largest safe value. ``torch.amp.GradScaler`` follows the same rules; ``LossScaler``
makes the same decisions on the same gradients.
"""

from __future__ import annotations

import torch


class LossScaler:
    """``scale(loss).backward()``; ``unscale_(opt)`` (before clipping);
    ``step(opt)`` (skipped on inf/NaN); ``update()`` (halve or grow the scale)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self._scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self._clean_steps = 0  # steps in a row without inf/NaN
        self._unscaled: set[int] = set()  # optimizers unscaled this step
        self.found_inf = False

    def get_scale(self) -> float:
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current scale: backpropagate this one."""
        return loss * self._scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale, in place, and note whether
        any is inf or NaN. Call it before clipping, so the clip sees true norms."""
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_ was already called on this optimizer")
        # the reciprocal as GradScaler computes it: in float64, rounded to float32
        inv = torch.tensor(self._scale, dtype=torch.float64).reciprocal().float()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not torch.isfinite(p.grad).all():
                    self.found_inf = True
                p.grad.mul_(inv.to(p.grad.dtype))
        self._unscaled.add(id(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless a gradient was inf/NaN; True if it stepped."""
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        if self.found_inf:
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        """After the step: halve the scale after an overflow, grow it after
        ``growth_interval`` clean steps in a row."""
        if self.found_inf:
            self._scale *= self.backoff_factor
            self._clean_steps = 0
        else:
            self._clean_steps += 1
            if self._clean_steps == self.growth_interval:
                self._scale *= self.growth_factor
                self._clean_steps = 0
        self.found_inf = False
        self._unscaled.clear()
