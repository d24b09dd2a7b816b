"""Which attention heads copy, and does the model need them? Averaged attention and
head ablation for the *repeat* task.

One attention map of one head on one sentence is an anecdote. Two measurements turn it
into evidence:

* **Attention, averaged.** ``copy_attention`` teacher-forces many held-out examples
  (prompt + right answer) and asks, for every layer and head, how much attention each
  answer position gives to the input token the model should copy next, against a
  control: the same query's attention to the *other* input tokens.
* **Ablation.** ``ablate_heads`` switches heads off (their outputs set to zero before
  the output projection ``c_proj`` mixes the heads) and ``ablation_accuracy`` measures
  the task again. A head the model needs costs accuracy when it is gone; a head that
  only *looks* as if it copied does not. Comparing against ablating other heads tells
  a specific effect from the general damage of removing any head.

The alignment, at token level. In an example whose answer repeats its input, the
answer's tokens ``a_0 .. a_{m-1}`` also stand, in the same order, in the prompt at
positions ``p_0 .. p_{m-1}`` (the input). The query at position ``t`` predicts token
``t + 1``; so the query that predicts ``a_j`` (the token just before it: the last
prompt token for ``j = 0``, else ``a_{j-1}``) has ``p_j`` as its **source**, the token
to copy. This is also where an *induction head* looks (Olsson et al., 2022): the
current token ``a_{j-1}`` appeared before at ``p_{j-1}``, and an induction head attends
to the token that followed it, ``p_{j-1} + 1 = p_j``. The two definitions agree, so a
high score says "copy or induction head" without telling them apart. The end marker's
prediction has no source in the input and is left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shared.chat import encode_instruction, stop_id
from shared.evaluation.instructions import task_accuracy
from shared.sft import IGNORE
from shared.tasks import Example, check_answer


@dataclass
class CopyAlignment:
    """One teacher-forced example: its ids, and for each answer token ``j`` the query
    that predicts it (``queries[j]``) and the input position holding it
    (``sources[j]``); ``input_span`` is ``(p_0, p_{m-1} + 1)``."""

    ids: list[int]
    queries: list[int]
    sources: list[int]

    @property
    def input_span(self) -> tuple[int, int]:
        return self.sources[0], self.sources[-1] + 1


def copy_alignment(tokenizer, example: Example) -> CopyAlignment | None:
    """Align the answer's tokens with the same tokens in the prompt, or None when the
    answer's token ids do not stand as one run in the prompt (not a copying example).

    Works for the chat format and the text template alike (``encode_instruction``).
    If the run occurs more than once, the last one before the answer is the input.
    """
    ids, labels = encode_instruction(
        tokenizer, example.instruction, example.input, example.output
    )
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    answer = ids[start:-1]  # the response without its end marker
    m = len(answer)
    if m == 0:
        return None
    for p in range(start - m, -1, -1):  # latest run first
        if ids[p : p + m] == answer:
            queries = list(range(start - 1, start - 1 + m))
            return CopyAlignment(ids, queries, list(range(p, p + m)))
    return None


def _aligned(tokenizer, examples: Sequence[Example]) -> tuple[list[CopyAlignment], int]:
    """The alignments of the examples that have one, and how many had none."""
    found = [copy_alignment(tokenizer, e) for e in examples]
    kept = [a for a in found if a is not None]
    if not kept:
        raise ValueError(
            "no example's answer stands as a run of tokens in its prompt: "
            "copy attention needs copying examples (the repeat task)"
        )
    return kept, len(found) - len(kept)


def _maps(
    model: nn.Module, tokenizer, alignments: list[CopyAlignment], batch_size: int
) -> Iterator[tuple[CopyAlignment, torch.Tensor]]:
    """Each alignment with its attention maps (n_layer, n_head, T, T), computed in
    right-padded batches (padding after a row's tokens cannot change them: every
    query sees only earlier keys)."""
    device = next(model.parameters()).device
    pad = stop_id(tokenizer)
    for i in range(0, len(alignments), batch_size):
        rows = alignments[i : i + batch_size]
        T = max(len(a.ids) for a in rows)
        idx = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, a in enumerate(rows):
            idx[r, : len(a.ids)] = torch.tensor(a.ids)
            mask[r, : len(a.ids)] = 1
        maps = model.attention_maps(idx.to(device), mask.to(device)).float().cpu()
        for r, a in enumerate(rows):
            yield a, maps[:, r]


def copy_attention(
    model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 32
) -> dict:
    """Mean attention from each answer query to its source token, per layer and head.

    Returns a dict of (n_layer, n_head) tensors, each a mean over examples of the
    mean over the example's answer tokens:

    * ``"copy"``: attention to the source ``p_j`` (1.0: a perfect copy head);
    * ``"control"``: attention to one *other* input token, averaged over them (the
      expected score if the sources were shuffled among the input positions). Input
      positions holding the same token id as the source are not counted as "other";
    * ``"excess"``: ``copy - control``, the attention that finds the *right* word;

    and ``"per_example"`` / ``"per_example_control"`` (n_examples, n_layer, n_head)
    for intervals, ``"n_examples"``, ``"n_skipped"`` (no alignment) and
    ``"n_queries"`` (answer tokens scored).
    """
    alignments, skipped = _aligned(tokenizer, examples)
    copies, controls, n_queries = [], [], 0
    for a, maps in _maps(model, tokenizer, alignments, batch_size):
        q, s = torch.tensor(a.queries), torch.tensor(a.sources)
        T = len(a.ids)
        rows = maps[:, :, q, :T]  # (L, H, m, T): what each answer query attends to
        copies.append(rows[..., torch.arange(len(q)), s].mean(-1))
        lo, hi = a.input_span
        ids = torch.tensor(a.ids)
        others = torch.zeros(len(q), T)  # (m, T): 1 on the other input tokens
        others[:, lo:hi] = 1.0
        others[ids[s][:, None] == ids[None, :]] = 0.0  # the source and its twins
        count = others.sum(-1)
        # 0 / 0 = nan for a query whose input holds only copies of its source
        controls.append(((rows * others).sum(-1) / count).nanmean(-1))
        n_queries += len(q)
    per_example = torch.stack(copies)
    per_control = torch.stack(controls)
    copy, control = per_example.mean(0), per_control.nanmean(0)
    return {
        "copy": copy,
        "control": control,
        "excess": copy - control,
        "per_example": per_example,
        "per_example_control": per_control,
        "n_examples": len(alignments),
        "n_skipped": skipped,
        "n_queries": n_queries,
    }


def top_heads(scores: torch.Tensor, k: int = 1) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the highest scores, best first."""
    flat = scores.flatten().argsort(descending=True)[:k]
    n_head = scores.size(1)
    return [(int(i) // n_head, int(i) % n_head) for i in flat]


def copy_map(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    layer: int,
    head: int,
    size: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """One head's attention from answer queries to input tokens, aligned on the task
    and averaged over examples: a (size, size) map for ``plotting.attention_heatmap``.

    Row ``j`` is the query that predicts answer token ``j``, column ``i`` the ``i``-th
    input token; a copy head draws the diagonal. Every example contributes its first
    ``size`` answer and input tokens; ``size`` defaults to the shortest example's
    length, so every cell averages over all examples (a longer ``size`` drops the
    examples that are shorter).
    """
    alignments, _ = _aligned(tokenizer, examples)
    size = size or min(len(a.sources) for a in alignments)
    alignments = [a for a in alignments if len(a.sources) >= size]
    if not alignments:
        raise ValueError(f"no example has {size} answer tokens")
    total = torch.zeros(size, size)
    for a, maps in _maps(model, tokenizer, alignments, batch_size):
        q = torch.tensor(a.queries[:size])
        total += maps[layer, head][q][:, a.sources[0] : a.sources[0] + size]
    return total / len(alignments)


# ---------------------------------------------------------------------------- ablation


def _check_heads(model: nn.Module, heads: Sequence[tuple[int, int]]) -> None:
    n_layer, n_head = model.config.n_layer, model.config.n_head
    for layer, head in heads:
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise ValueError(
                f"head ({layer}, {head}) does not exist: the model has {n_layer} "
                f"layers of {n_head} heads"
            )


@contextlib.contextmanager
def ablate_heads(
    model: nn.Module, heads: Sequence[tuple[int, int]]
) -> Iterator[nn.Module]:
    """Inside the block, the listed ``(layer, head)`` heads output zeros.

    A head's output is its slice of the concatenated heads that ``c_proj`` reads
    (``head * head_dim`` to ``(head + 1) * head_dim``); a forward pre-hook on that
    layer's ``c_proj`` zeroes the slice, so the rest of the network sees the model
    without those heads (``c_proj``'s bias stays: it belongs to no head). Works for
    every forward pass, generation with a KV cache included. The hooks are removed
    on exit, also on an error, and the model is exactly as before.
    """
    _check_heads(model, heads)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = []
    try:
        for layer, which in sorted(by_layer.items()):
            attn = model.transformer.h[layer].attn
            hook = _zero_heads(sorted(set(which)), attn.n_head, attn.head_dim)
            handles.append(attn.c_proj.register_forward_pre_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _zero_heads(heads: list[int], n_head: int, head_dim: int):
    """A ``c_proj`` pre-hook that zeroes ``heads`` of its (..., n_head * head_dim)
    input, on a copy (the attention's own tensor is left alone)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        split = x.unflatten(-1, (n_head, head_dim)).clone()
        split[..., heads, :] = 0.0
        return (split.flatten(-2), *args[1:])

    return hook


def ablation_accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    heads: Sequence[tuple[int, int]],
    slack: int = 4,
) -> dict:
    """Task accuracy with ``heads`` ablated (``task_accuracy``'s greedy answers).

    Returns ``"accuracy"`` (per task and ``"all"``), ``"correct"`` (one bool per
    example, in order: pair it with another run on the same examples for a paired
    test such as McNemar's) and ``"responses"``.
    """
    with ablate_heads(model, heads):
        acc, responses = task_accuracy(model, tokenizer, examples, slack)
    correct = [check_answer(e, r) for e, r in zip(examples, responses, strict=True)]
    return {"accuracy": acc, "correct": correct, "responses": responses}


def single_head_ablations(
    model: nn.Module, tokenizer, examples: Sequence[Example], slack: int = 4
) -> dict:
    """``ablation_accuracy`` for every head alone, and for none.

    Returns ``"accuracy"`` (n_layer, n_head): the accuracy over all ``examples`` with
    that one head ablated; ``"correct"`` (n_layer, n_head, n_examples) booleans;
    ``"baseline"`` and ``"baseline_correct"``: the same with no head ablated.
    """
    n_layer, n_head = model.config.n_layer, model.config.n_head
    base = ablation_accuracy(model, tokenizer, examples, [], slack)
    correct = torch.zeros(n_layer, n_head, len(examples), dtype=torch.bool)
    for layer in range(n_layer):
        for head in range(n_head):
            run = ablation_accuracy(model, tokenizer, examples, [(layer, head)], slack)
            correct[layer, head] = torch.tensor(run["correct"])
    return {
        "accuracy": correct.float().mean(-1),
        "correct": correct,
        "baseline": base["accuracy"]["all"],
        "baseline_correct": base["correct"],
    }
