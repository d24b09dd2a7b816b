"""Supervised fine-tuning: the prompt template, loss masking, padding and scoring.

An example becomes one token sequence ``prompt + response + <|endoftext|>``. The
model learns only the response: every prompt position gets the label -100, which
``F.cross_entropy`` (and so ``GPT.forward``) leaves out of the loss. A batch is
right-padded to its longest sequence; padding is masked out of attention and of the
loss. ``with_replay`` and ``replay_loss`` mix pretraining text into the batches, so
the model keeps its language while it learns the tasks. Scoring the fine-tuned
model's answers is evaluation: ``answers``, ``task_accuracy`` and ``response_loss``
live in ``shared.evaluation.instructions``. The chat format is ``shared.chat``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from shared.tasks import Example

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


def with_replay(batches: Iterator, windows) -> Iterator[tuple]:
    """Pair each fine-tuning batch with a batch of pretraining windows ``(x, y)``
    (``windows.next()``, e.g. a ``shared.dataset.BatchSampler`` over the play)."""
    for batch in batches:
        yield batch, windows.next()


def replay_loss(loss_fn, weight: float):
    """``loss_fn`` on ``(batch, (x, y))`` pairs from ``with_replay``: ``(1 - weight)``
    times the fine-tuning loss plus ``weight`` times the next-token loss on the
    pretraining text ("replay", as in continual learning: the model keeps practising
    what it should not forget). Metrics gain ``replay_loss``."""

    def mixed(model: nn.Module, pair: tuple) -> tuple[torch.Tensor, dict]:
        batch, (x, y) = pair
        out = loss_fn(model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        device = next(model.parameters()).device
        _, lm_loss = model(x.to(device), y.to(device))
        mix = (1 - weight) * loss + weight * lm_loss
        return mix, {
            **metrics,
            "task_loss": loss.detach(),
            "replay_loss": lm_loss.detach(),
        }

    return mixed
