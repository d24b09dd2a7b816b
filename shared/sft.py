"""Supervised fine-tuning: the prompt template, loss masking, padding and scoring.

An example becomes one token sequence ``prompt + response + <|endoftext|>``. The
model learns only the response: every prompt position gets the label -100, which
``F.cross_entropy`` (and so ``GPT.forward``) leaves out of the loss. A batch is
right-padded to its longest sequence; padding is masked out of attention and of the
loss. ``answers`` generates greedy responses for many prompts at once (left-padded),
and ``task_accuracy`` checks them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from shared.generate import generate
from shared.tasks import Example, check_answer

PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
IGNORE = -100  # the label F.cross_entropy skips


def format_prompt(instruction: str, input: str) -> str:
    """The course's one prompt template (Alpaca's layout, shortened)."""
    return PROMPT.format(instruction=instruction, input=input)


def eos_id(tokenizer) -> int:
    """The id of ``<|endoftext|>``: ends every response, pads every batch."""
    return tokenizer.special_tokens["<|endoftext|>"]


def encode_example(
    tokenizer, prompt: str, response: str, mask_prompt: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + response + <|endoftext|>`` and their labels.

    ``labels[i]`` is ``ids[i]``, or -100 where the loss must not look (the prompt,
    when ``mask_prompt``). The prompt ends in a newline, so encoding the two parts
    apart gives the same ids as encoding them together (tested).
    """
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response) + [eos_id(tokenizer)]
    labels = ([IGNORE] * len(prompt_ids) if mask_prompt else prompt_ids) + response_ids
    return prompt_ids + response_ids, labels


def encode_examples(
    tokenizer, examples: Sequence[Example], mask_prompt: bool = True
) -> list[tuple[list[int], list[int]]]:
    """``encode_example`` for every example (instruction + input -> output)."""
    return [
        encode_example(
            tokenizer, format_prompt(e.instruction, e.input), e.output, mask_prompt
        )
        for e in examples
    ]


def collate(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int, context_length: int
) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels)`` pairs into model inputs and next-token targets.

    Returns ``input_ids`` and ``attention_mask`` (B, T) and ``targets`` (B, T):
    ``targets[:, t]`` is the label of token ``t + 1`` (the shift a causal LM needs),
    -100 on padding. Sequences longer than ``context_length + 1`` are refused.
    """
    longest = max(len(ids) for ids, _ in batch)
    if longest > context_length + 1:
        raise ValueError(
            f"an example has {longest} tokens; the model sees {context_length} "
            "(shorten it or filter it out)"
        )
    T = longest - 1
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for row, (ids, labels) in enumerate(batch):
        n = len(ids) - 1
        input_ids[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(labels[1:])
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "targets": targets}


def batches(
    encoded: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    context_length: int,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches forever, a new order each epoch (seeded)."""
    rng = random.Random(seed)
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [encoded[j] for j in order[i : i + batch_size]]
            yield collate(chunk, pad_id, context_length)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (not -100) tokens of a batch."""
    device = next(model.parameters()).device
    _, loss = model(
        batch["input_ids"].to(device),
        batch["targets"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    )
    return loss


@torch.no_grad()
def response_loss(
    model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 64
) -> float:
    """Mean loss (nats/token) on the response tokens only, over all of ``examples``.

    The same number whatever the model was trained on, so models trained with and
    without prompt masking compare fairly.
    """
    was_training = model.training
    model.eval()
    encoded = encode_examples(tokenizer, examples, mask_prompt=True)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], eos_id(tokenizer),
                        model.config.context_length)  # fmt: skip
        n = int((batch["targets"] != IGNORE).sum())
        total += float(sft_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / count


@torch.no_grad()
def answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 40,
    batch_size: int = 64,
) -> list[str]:
    """Greedy responses to ``prompts``, up to ``<|endoftext|>`` (left-padded batches).

    ``max_new_tokens`` may be one budget per prompt: prompts are then batched with
    others of a similar budget, so short answers do not wait for long ones.
    """
    device = next(model.parameters()).device
    eos = eos_id(tokenizer)
    budgets = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
               else list(max_new_tokens))  # fmt: skip
    order = sorted(range(len(prompts)), key=lambda i: budgets[i])
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoded = [tokenizer.encode(prompts[i]) for i in rows]
        T = max(len(ids) for ids in encoded)
        idx = torch.full((len(encoded), T), eos, dtype=torch.long)
        mask = torch.zeros((len(encoded), T), dtype=torch.long)
        for row, ids in enumerate(encoded):
            idx[row, T - len(ids) :] = torch.tensor(ids)
            mask[row, T - len(ids) :] = 1
        n_new = min(max(budgets[i] for i in rows), model.config.context_length - T)
        result = generate(
            model, idx.to(device), n_new, temperature=0.0, eos_id=eos,
            attention_mask=mask.to(device),
        )  # fmt: skip
        for i, ids in zip(rows, result[:, T:].tolist(), strict=True):
            out[i] = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
    return out


def task_accuracy(
    model: nn.Module, tokenizer, examples: Sequence[Example], slack: int = 4
) -> tuple[dict[str, float], list[str]]:
    """Exact-match accuracy per task (and ``"all"``), and the responses.

    Each response may run ``slack`` tokens longer than the right answer (plus the end
    marker); one that has not stopped by then cannot be an exact match anyway.
    """
    prompts = [format_prompt(e.instruction, e.input) for e in examples]
    budgets = [len(tokenizer.encode(e.output)) + 1 + slack for e in examples]
    responses = answers(model, tokenizer, prompts, budgets)
    hits: dict[str, list[bool]] = {}
    for e, r in zip(examples, responses, strict=True):
        hits.setdefault(e.task, []).append(check_answer(e, r))
    acc = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    acc["all"] = sum(sum(h) for h in hits.values()) / len(examples)
    return acc, responses


def accuracy_interval(p: float, n: int, z: float = 1.96) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy."""
    return z * math.sqrt(max(p * (1 - p), 1e-12) / n)
