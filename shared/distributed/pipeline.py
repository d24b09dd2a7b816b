"""Pipeline parallelism for the course GPT: contiguous groups of blocks as stages.

``torch.distributed.pipelining`` runs the schedules (GPipe, 1F1B); this module cuts
the model into the stages it runs.
"""

from __future__ import annotations

import torch
from torch import nn


class GPTStage(nn.Module):
    """Blocks ``[start, stop)`` of a GPT; the first stage also embeds the tokens, the
    last one also normalises and projects to logits.

    Modules keep the GPT's names (``transformer.h.3.attn...``), so each stage's state
    dict is a piece of the full one. The last stage's head is its own copy of the
    token embedding (the two stages cannot share one tensor): summing the two copies'
    gradients after every backward pass keeps them equal, as Megatron-LM does.
    """

    def __init__(self, model: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.config = model.config
        self.first, self.last = start == 0, stop == model.config.n_layer
        self.tied = model.config.tie_weights  # the head is a copy of the embedding
        tr = model.transformer
        parts: dict[str, nn.Module] = {"h": nn.ModuleDict(
            {str(i): tr.h[i] for i in range(start, stop)})}  # fmt: skip
        if self.first:
            parts |= {k: tr[k] for k in ("wte", "wpe", "drop") if k in tr}
        if self.last:
            parts["ln_f"] = tr.ln_f
            head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
            head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
            self.lm_head = head
        self.transformer = nn.ModuleDict(parts)
        table = getattr(model, "pos_table", None)  # sinusoidal positions (a buffer)
        if self.first and table is not None:
            self.register_buffer("pos_table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        if self.first:  # as GPT._embed: tokens plus positions (RoPE acts in attention)
            h = tr.wte(x)
            pos = torch.arange(x.size(1), device=x.device)
            if "wpe" in tr:
                h = h + tr.wpe(pos)
            elif hasattr(self, "pos_table"):
                h = h + self.pos_table[pos]
            x = tr.drop(h)
        for block in tr.h.values():
            x = block(x)
        if self.last:
            x = self.lm_head(tr.ln_f(x))
        return x


def split_layers(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Balanced ``(start, stop)`` block ranges, one per pipeline stage."""
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"cannot split {n_layer} blocks into {n_stages} stages")
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
