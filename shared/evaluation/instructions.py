"""Instruction-following accuracy: greedy answers to many prompts at once
(``answers``, left-padded batches) checked exactly against the tasks' answers
(``task_accuracy``), with the interval of an accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from shared.chat import encode_examples, prompt_ids, stop_id
from shared.generation import generate
from shared.model import evaluating
from shared.sft import IGNORE, collate, sft_loss
from shared.tasks import Example, check_answer


@torch.no_grad()
def answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int | Sequence[int] = 40,
    batch_size: int = 64,
) -> list[str]:
    """Greedy responses to ``prompts`` (texts or token ids), up to the end marker
    (``shared.chat.stop_id``: ``<|end|>`` for a chat model), in left-padded batches.

    ``max_new_tokens`` may be one budget per prompt: prompts are then batched with
    others of a similar budget, so short answers do not wait for long ones.
    """
    device = next(model.parameters()).device
    eos = stop_id(tokenizer)
    context = model.config.context_length
    budgets = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
               else list(max_new_tokens))  # fmt: skip
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    # each row's own budget, capped only by its own room in the window: a left-padded
    # row sees the same tokens and positions as alone, however long the others are
    limit = [
        max(0, min(b, context - len(ids)))
        for b, ids in zip(budgets, encoded, strict=True)
    ]
    order = sorted(range(len(prompts)), key=lambda i: (limit[i], len(encoded[i])))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = max(len(encoded[i]) for i in rows)
        idx = torch.full((len(rows), T), eos, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for row, i in enumerate(rows):
            idx[row, T - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, T - len(encoded[i]) :] = 1
        result = generate(
            model, idx.to(device), max(limit[i] for i in rows), temperature=0.0,
            eos_id=eos, attention_mask=mask.to(device),
        )  # fmt: skip
        for i, ids in zip(rows, result[:, T:].tolist(), strict=True):
            ids = ids[: limit[i]]
            out[i] = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
    return out


def task_accuracy(
    model: nn.Module, tokenizer, examples: Sequence[Example], slack: int = 4
) -> tuple[dict[str, float], list[str]]:
    """Exact-match accuracy per task (and ``"all"``), and the responses.

    Each response may run ``slack`` tokens longer than the right answer (plus the end
    marker); one that has not stopped by then cannot be an exact match anyway.
    """
    prompts = [prompt_ids(tokenizer, e.instruction, e.input) for e in examples]
    budgets = [len(tokenizer.encode(e.output)) + 1 + slack for e in examples]
    responses = answers(model, tokenizer, prompts, budgets)
    hits: dict[str, list[bool]] = {}
    for e, r in zip(examples, responses, strict=True):
        hits.setdefault(e.task, []).append(check_answer(e, r))
    acc = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    acc["all"] = sum(sum(h) for h in hits.values()) / len(examples)
    return acc, responses


@torch.no_grad()
def response_loss(
    model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 64
) -> float:
    """Mean loss (nats/token) on the response tokens only (and the end marker), over
    all of ``examples``, one turn each, in the tokenizer's format.

    The same number whatever the model was trained on, so models trained with and
    without prompt masking compare fairly.
    """
    with evaluating(model):
        encoded = encode_examples(tokenizer, examples, mask_prompt=True)
        total, count = 0.0, 0
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i : i + batch_size], stop_id(tokenizer),
                            model.config.context_length)  # fmt: skip
            n = int((batch["targets"] != IGNORE).sum())
            total += float(sft_loss(model, batch)) * n
            count += n
    return total / count


def accuracy_interval(p: float, n: int, z: float = 1.96) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy."""
    return z * math.sqrt(max(p * (1 - p), 1e-12) / n)
