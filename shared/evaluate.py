"""Measuring a language model, from the loss up to a report.

- Intrinsic: mean loss on random batches or a whole split, sliding-window scoring
  with a stride, perplexity, bits per character and per byte (comparable across
  tokenizers).
- Log-likelihood scoring the way lm-evaluation-harness does it: ``loglikelihood``
  of ``(context, continuation)`` pairs, multiple-choice items scored by summed
  (``acc``) and length-normalised (``acc_norm``) log-likelihood, bootstrap intervals.
- Calibration of next-token predictions (reliability, expected calibration error),
  generation statistics, n-gram contamination checks, and ``evaluate_model``: one
  report for a checkpoint (``python -m shared.evaluate``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.data import REPO_ROOT
from shared.dataset import BatchSampler
from shared.tasks import speeches


def context_length_of(model: nn.Module, context_length: int | None = None) -> int:
    """``context_length`` if given, else the model's ``config.context_length``."""
    if context_length is not None:
        return context_length
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "context_length"):
        raise ValueError("pass context_length: the model has no config.context_length")
    return int(cfg.context_length)


def autocast(device: torch.device, dtype: str):
    """Forward-pass precision: ``"float32"`` (no-op) or ``"bfloat16"`` autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    splits: dict[str, object],
    *,
    eval_iters: int,
    batch_size: int,
    context_length: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, float]:
    """Mean loss (nats/token) per split over ``eval_iters`` random batches.

    A fresh generator with a fixed seed draws the same batches at every evaluation,
    so successive points on the curve differ only because the model changed.
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for name, data in splits.items():
        sampler = BatchSampler(data, batch_size, T, seed=seed)
        losses = []
        for _ in range(eval_iters):
            x, y = sampler.next()
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.float().item())
        out[name] = float(np.mean(losses))
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    data,
    *,
    context_length: int | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> float:
    """Mean loss (nats/token) over a whole split, in non-overlapping windows.

    Every token (but the first) is predicted exactly once; deterministic, unlike
    ``estimate_loss``. ``max_tokens`` evaluates only a prefix (fast checks).
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(data, dtype=np.int64))
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n_win = (len(ids) - 1) // T
    if n_win == 0:
        raise ValueError(f"split of {len(ids)} tokens is shorter than one window ({T})")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    x_all = ids[: n_win * T].view(n_win, T)
    y_all = ids[1 : n_win * T + 1].view(n_win, T)
    for i in range(0, n_win, batch_size):
        x, y = (
            x_all[i : i + batch_size].to(device),
            y_all[i : i + batch_size].to(device),
        )
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def bits_per_char(nats_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a per-token loss to bits per character, comparable across tokenizers."""
    return nats_per_token * n_tokens / n_chars / math.log(2)


def perplexity(nats_per_token: float) -> float:
    """``exp(loss)``: how many equally likely tokens the model is choosing among."""
    return math.exp(nats_per_token)


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """A per-token loss as bits per UTF-8 byte of the text (the Pile's convention)."""
    return nats_per_token * n_tokens / n_bytes / math.log(2)


# ------------------------------------------------------------- sliding windows


@dataclass
class TokenScores:
    """Per-token results of scoring a text: loss (nats), the model's top probability,
    whether its top choice was right, and how many tokens of context each one had."""

    loss: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    context: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over ``n`` targets (inputs 0..n-1).

    Window ``[begin, end)`` of inputs predicts targets ``begin+1..end``; each target
    is scored by the first window that reaches it, ``stride`` new ones per window.
    """
    out, scored, begin = [], 0, 0
    while scored < n:
        end = min(begin + size, n)
        out.append((begin, end, scored))
        scored = end
        begin += stride
    return out


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    ids,
    *,
    stride: int | None = None,
    context_length: int | None = None,
    batch_size: int = 32,
    temperature: float = 1.0,
) -> TokenScores:
    """Score every token of ``ids`` (but the first) once, in sliding windows.

    Windows of the model's context length start every ``stride`` tokens and score
    only the targets no earlier window reached, so every scored token (after the
    first window) sees at least ``context_length - stride`` tokens of context.
    ``stride=None`` means non-overlapping windows (stride = context length).
    ``temperature`` divides the logits first (calibration by temperature scaling).
    """
    T = context_length_of(model, context_length)
    stride = T if stride is None else stride
    if not 1 <= stride <= T:
        raise ValueError(f"stride must be in 1..{T}, got {stride}")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids) - 1
    if n < 1:
        raise ValueError("need at least two tokens to score")
    device = next(model.parameters()).device
    loss, conf = np.zeros(n, np.float32), np.zeros(n, np.float32)
    correct, ctx = np.zeros(n, bool), np.zeros(n, np.int64)
    windows = _windows(n, T, stride)
    was_training = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - b for b, e, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        for row, (b, e, _) in enumerate(group):
            x[row, : e - b] = ids[b:e]
        logits = model(x.to(device)).float() / temperature
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for row, (b, e, first) in enumerate(group):
            pos = torch.arange(first - b, e - b)  # window positions to score
            target = ids[first + 1 : e + 1]
            lp = logp[row, pos]
            loss[first:e] = (-lp.gather(1, target[:, None])[:, 0]).numpy()
            top = lp.max(dim=1)
            conf[first:e] = top.values.exp().numpy()
            correct[first:e] = (top.indices == target).numpy()
            ctx[first:e] = (pos + 1).numpy()
    model.train(was_training)
    return TokenScores(loss, conf, correct, ctx)


# ------------------------------------------------------ log-likelihood requests


def split_request(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """Token ids of a ``(context, continuation)`` pair, as lm-evaluation-harness does.

    Trailing whitespace of the context moves to the start of the continuation, the
    whole string is encoded once, and the continuation is what follows the
    context's own tokens, so the split never cuts a word the tokenizer would merge.
    An empty context becomes ``<|endoftext|>``; the string ``<|endoftext|>`` in a
    request is that token, as Hugging Face tokenizers (and so the harness) read it.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
        eot = tokenizer.special_tokens["<|endoftext|>"]
        return [eot], tokenizer.encode(continuation, allowed_special="all")
    whole = tokenizer.encode(context + continuation, allowed_special="all")
    n_ctx = len(tokenizer.encode(context, allowed_special="all"))
    return whole[:n_ctx], whole[n_ctx:]


@torch.no_grad()
def loglikelihood(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    context_length: int | None = None,
) -> list[tuple[float, bool]]:
    """Per ``(context, continuation)``: the summed log-probability (nats) of the
    continuation's tokens given the context, and whether greedy decoding would
    produce exactly those tokens (lm-evaluation-harness's ``loglikelihood``).

    A pair longer than the context window keeps its last ``context_length + 1``
    tokens (the context is cut from the left), as the harness does.
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    encoded = []
    for context, continuation in requests:
        ctx, cont = split_request(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"empty continuation for context {context[-40:]!r}")
        if len(cont) > T:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds window {T}")
        encoded.append(((ctx + cont)[-(T + 1) :][:-1], cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    was_training = model.training
    model.eval()
    for i in range(0, len(order), batch_size):
        group = order[i : i + batch_size]
        width = max(len(encoded[j][0]) for j in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        for row, j in enumerate(group):
            x[row, : len(encoded[j][0])] = torch.tensor(encoded[j][0])
        logp = torch.log_softmax(model(x.to(device)).float(), dim=-1).cpu()
        for row, j in enumerate(group):
            inp, cont = encoded[j]
            lp = logp[row, len(inp) - len(cont) : len(inp)]
            target = torch.tensor(cont)
            total = lp.gather(1, target[:, None]).sum().item()
            out[j] = (total, bool((lp.argmax(dim=1) == target).all()))
    model.train(was_training)
    return out


# ------------------------------------------------------------ multiple choice

EVAL_DIR = REPO_ROOT / "data" / "eval"
MC_TASKS = ("next_line", "speaker")


@dataclass
class MCItem:
    """A multiple-choice item: a context, its choices, the index of the right one."""

    id: str
    task: str
    context: str
    choices: list[str]
    label: int


@dataclass
class MCResult:
    """Per-item log-likelihoods of every choice and the two accuracies."""

    items: list[MCItem]
    loglikelihoods: list[list[float]]
    greedy: list[list[bool]]

    @property
    def pred(self) -> np.ndarray:
        """The choice with the highest summed log-likelihood (``acc``)."""
        return np.array([int(np.argmax(ll)) for ll in self.loglikelihoods])

    @property
    def pred_norm(self) -> np.ndarray:
        """The highest log-likelihood per character of the choice (``acc_norm``)."""
        return np.array(
            [
                int(np.argmax(np.array(ll) / [len(c) for c in item.choices]))
                for ll, item in zip(self.loglikelihoods, self.items, strict=True)
            ]
        )

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items])

    def correct(self, norm: bool = False) -> np.ndarray:
        """Per item, 1.0 where the prediction is the label."""
        return ((self.pred_norm if norm else self.pred) == self.labels).astype(float)

    def accuracy(self, norm: bool = False) -> float:
        return float(self.correct(norm).mean())


def mc_requests(items: Sequence[MCItem]) -> list[tuple[str, str]]:
    """One ``(context, choice)`` request per choice of every item, in order."""
    return [(item.context, choice) for item in items for choice in item.choices]


def score_mc(
    model: nn.Module, tokenizer, items: Sequence[MCItem], batch_size: int = 32
) -> MCResult:
    """Score every choice of every item with ``loglikelihood``."""
    flat = loglikelihood(model, tokenizer, mc_requests(items), batch_size=batch_size)
    lls, greedy, k = [], [], 0
    for item in items:
        part = flat[k : k + len(item.choices)]
        lls.append([ll for ll, _ in part])
        greedy.append([g for _, g in part])
        k += len(item.choices)
    return MCResult(list(items), lls, greedy)


def chance_accuracy(items: Sequence[MCItem]) -> float:
    """The expected accuracy of guessing uniformly among each item's choices."""
    return float(np.mean([1 / len(item.choices) for item in items]))


def _speech_text(name: str, lines: Sequence[str], last: int = 3) -> str:
    return name + ":\n" + "\n".join(lines[-last:]) + "\n"


def make_next_line_items(
    text: str, n: int, seed: int = 0, n_choices: int = 4
) -> list[MCItem]:
    """Which of ``n_choices`` lines comes next? One item per speech of ``text``.

    Context: the speaker's name and up to three lines of the speech; the right
    choice is the speech's next line, the others are lines of other speeches (their
    lengths are not matched, which is what ``acc_norm`` is about).
    """
    rng = random.Random(seed)
    talks = speeches(text)
    pool = [
        (s, line) for s, (_, lines) in enumerate(talks) for line in lines
        if len(line.split()) >= 3
    ]  # fmt: skip
    places = [
        (s, i) for s, (_, lines) in enumerate(talks)
        for i in range(1, len(lines)) if len(lines[i].split()) >= 3
    ]  # fmt: skip
    rng.shuffle(places)
    items, used = [], set()
    for s, i in places:
        if s in used:
            continue
        used.add(s)
        name, lines = talks[s]
        answer = lines[i]
        others: list[str] = []
        while len(others) < n_choices - 1:
            t, line = rng.choice(pool)
            if t != s and line != answer and line not in others:
                others.append(line)
        choices = others + [answer]
        rng.shuffle(choices)
        context = _speech_text(name, lines[:i])
        items.append(
            MCItem(f"next_line-{len(items):04d}", "next_line", context, choices,
                   choices.index(answer))
        )  # fmt: skip
        if len(items) == n:
            break
    return items


def make_speaker_items(
    text: str, n: int, seed: int = 0, n_choices: int = 4, min_speeches: int = 3
) -> list[MCItem]:
    """Which character speaks next? One item per speech that follows another.

    Context: the previous speech (name and up to three lines). Each choice is a
    name followed by the speech's first line, so the model scores name and line
    together, ``log p(name, line | context)``; the other names are characters with
    at least ``min_speeches`` speeches in ``text``.
    """
    rng = random.Random(seed)
    talks = speeches(text)
    counts = Counter(name for name, _ in talks)
    cast = sorted(name for name, c in counts.items() if c >= min_speeches)
    order = list(range(1, len(talks)))
    rng.shuffle(order)
    items = []
    for s in order:
        name, lines = talks[s]
        if name not in cast or len(lines[0].split()) < 3:
            continue
        names = rng.sample([c for c in cast if c != name], n_choices - 1) + [name]
        rng.shuffle(names)
        prev_name, prev_lines = talks[s - 1]
        context = _speech_text(prev_name, prev_lines) + "\n"
        choices = [f"{c}:\n{lines[0]}" for c in names]
        items.append(
            MCItem(f"speaker-{len(items):04d}", "speaker", context, choices,
                   names.index(name))
        )  # fmt: skip
        if len(items) == n:
            break
    return items


def held_out_text() -> str:
    """The last 10% of Tiny Shakespeare: the text no course model was trained on."""
    from shared.data import read_text
    from shared.dataset import train_val_split

    return train_val_split(read_text("tinyshakespeare"), 0.1)[1]


def load_mc_items(task: str, folder: Path | None = None) -> list[MCItem]:
    """The course's multiple-choice items of ``task`` (``data/eval/{task}.jsonl``)."""
    if task not in MC_TASKS:
        raise ValueError(f"unknown task {task!r}; one of {MC_TASKS}")
    path = (folder or EVAL_DIR) / f"{task}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run chapters/08_evaluation/make_tasks.py"
        )
    with path.open() as f:
        return [MCItem(**json.loads(line)) for line in f]


# ------------------------------------------------------------------- intervals


def bootstrap_ci(
    values, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a, b, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Interval of ``mean(a) - mean(b)`` resampling items jointly (same items)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired values must have the same shape")
    return bootstrap_ci(a - b, n_resamples, alpha, seed)


def block_bootstrap_ci(
    values, block: int, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the mean of a sequence whose neighbours are correlated
    (per-token losses): resample whole blocks of ``block`` values."""
    values = np.asarray(values, dtype=float)
    n = len(values) // block
    if n < 2:
        raise ValueError(f"need at least two blocks of {block} values")
    means = values[: n * block].reshape(n, block).mean(axis=1)
    return bootstrap_ci(means, n_resamples, alpha, seed)


# ----------------------------------------------------------------- calibration


def reliability(confidence, correct, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and count."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    safe = np.maximum(count, 1)
    conf = np.bincount(which, confidence, n_bins) / safe
    acc = np.bincount(which, correct, n_bins) / safe
    return {"edges": edges, "confidence": conf, "accuracy": acc, "count": count}


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence per bin."""
    r = reliability(confidence, correct, n_bins)
    weight = r["count"] / r["count"].sum()
    return float((weight * np.abs(r["accuracy"] - r["confidence"])).sum())


# ---------------------------------------------------------- generated text


def words(text: str) -> list[str]:
    """Lower-cased words of a text (letters and apostrophes)."""
    return [w.lower() for w in re.findall(r"[A-Za-z']+", text) if w.strip("'")]


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all samples divided by all n-grams (diversity)."""
    grams = [g for s in samples for g in ngrams(words(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sample: str, n: int = 4) -> float:
    """Fraction of a sample's word n-grams that already occurred earlier in it."""
    grams = ngrams(words(sample), n)
    seen: set[tuple] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def generation_stats(samples: Sequence[str], vocabulary: set[str]) -> dict[str, float]:
    """Length, diversity, repetition and style statistics of generated samples.

    ``known_words``: the fraction of generated words found in ``vocabulary`` (the
    training text's words), a crude check that the words are real;
    ``speaker_lines``: the fraction of lines that are a ``NAME:`` heading.
    """
    ws = [words(s) for s in samples]
    lines = [ln for s in samples for ln in s.split("\n") if ln.strip()]
    all_words = [w for x in ws for w in x]
    headings = [ln for ln in lines if re.fullmatch(r"[A-Z][A-Za-z ']+:", ln.strip())]
    return {
        "words": float(np.mean([len(x) for x in ws])),
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "repetition_4": float(np.mean([repetition_rate(s, 4) for s in samples])),
        "known_words": float(np.mean([w in vocabulary for w in all_words]))
        if all_words
        else 0.0,
        "words_per_line": len(all_words) / max(len(lines), 1),
        "speaker_lines": len(headings) / max(len(lines), 1),
    }


def sample_texts(
    model: nn.Module,
    tokenizer,
    prompt: str,
    n: int,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[str]:
    """``n`` sampled continuations of one prompt (the continuation text only), each
    ending where the model emits ``<|endoftext|>`` (a fine-tuned model's stop)."""
    from shared.generate import generate

    device = next(model.parameters()).device
    eot = tokenizer.special_tokens["<|endoftext|>"]
    idx = torch.tensor([tokenizer.encode(prompt)] * n, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
        eos_id=eot, generator=gen,
    )  # fmt: skip
    texts = []
    for row in out[:, idx.size(1) :].tolist():
        texts.append(tokenizer.decode(row[: row.index(eot)] if eot in row else row))
    return texts


# -------------------------------------------------------------- contamination


def ngram_set(texts: Sequence[str], n: int) -> set[tuple]:
    """Every word n-gram of ``texts`` (the index a contamination check looks up)."""
    return {g for t in texts for g in ngrams(words(t), n)}


def ngram_overlap(texts: Sequence[str], index: set[tuple], n: int) -> np.ndarray:
    """Per text, the fraction of its word n-grams found in ``index`` (0 if it has
    none): 1.0 means every n-gram of the text occurs in the training data."""
    out = []
    for t in texts:
        grams = ngrams(words(t), n)
        out.append(np.mean([g in index for g in grams]) if grams else 0.0)
    return np.array(out, dtype=float)


def item_text(item: MCItem) -> str:
    """An item's context and right answer: the text a leak would contain."""
    return item.context + item.choices[item.label]


# ---------------------------------------------------------------------- report

REPORT_ROWS = {  # key in evaluate_model's result -> (label, higher is better)
    "bits_per_char": ("held-out bits/char", False),
    "perplexity": ("perplexity", False),
    "ece": ("calibration (ECE)", False),
    "next_line_acc": ("next line: acc", True),
    "next_line_acc_norm": ("next line: acc_norm", True),
    "speaker_acc": ("speaker: acc", True),
    "speaker_acc_norm": ("speaker: acc_norm", True),
    "instruct_acc": ("instructions: exact", True),
    "distinct_2": ("samples: distinct-2", True),
    "repetition_4": ("samples: rep. 4-grams", False),
    "known_words": ("samples: known words", True),
}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    tokenizer,
    *,
    text: str | None = None,
    items: dict[str, list[MCItem]] | None = None,
    examples: list | None = None,
    stride: int | None = None,
    n_samples: int = 16,
    max_new_tokens: int = 100,
    prompt: str = "ROMEO:\n",
    seed: int = 0,
) -> dict:
    """Every metric of the chapter for one model, with 95% bootstrap intervals.

    Defaults: the held-out 10% of Tiny Shakespeare scored in windows of stride
    ``context_length // 2``, both multiple-choice tasks, the held-out instruction
    examples of chapter 07, and ``n_samples`` samples of ``max_new_tokens`` tokens at
    temperature 1 from ``prompt``.
    """
    from shared.sft import task_accuracy
    from shared.tasks import check_answer, load_examples

    start = time.perf_counter()
    text = held_out_text() if text is None else text
    items = {t: load_mc_items(t) for t in MC_TASKS} if items is None else items
    examples = load_examples("test") if examples is None else examples
    T = context_length_of(model)
    ids = tokenizer.encode(text, disallowed_special=())
    scores = score_tokens(model, ids, stride=stride or T // 2)
    to_bpc = len(scores) / len(text) / math.log(2)  # nats/token -> bits/char
    loss = float(scores.loss.mean())
    lo, hi = block_bootstrap_ci(scores.loss, T, seed=seed)
    out: dict = {
        "loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_char": loss * to_bpc,
        "bits_per_char_ci": [lo * to_bpc, hi * to_bpc],
        "bits_per_byte": bits_per_byte(loss, len(scores), len(text.encode())),
        "ece": expected_calibration_error(scores.confidence, scores.correct),
        "top1": float(scores.correct.mean()),
    }
    for task, task_items in items.items():
        result = score_mc(model, tokenizer, task_items)
        for suffix, norm in (("acc", False), ("acc_norm", True)):
            correct = result.correct(norm)
            out[f"{task}_{suffix}"] = float(correct.mean())
            out[f"{task}_{suffix}_ci"] = list(bootstrap_ci(correct, seed=seed))
        out[f"{task}_chance"] = chance_accuracy(task_items)
    if examples:
        _, responses = task_accuracy(model, tokenizer, examples)
        right = [check_answer(e, r) for e, r in zip(examples, responses, strict=True)]
        out["instruct_acc"] = float(np.mean(right))
        out["instruct_acc_ci"] = list(bootstrap_ci(right, seed=seed))
    if n_samples:
        samples = sample_texts(
            model, tokenizer, prompt, n_samples, max_new_tokens, seed=seed
        )
        vocabulary = set(words(text)) | training_vocabulary()
        out.update(generation_stats(samples, vocabulary))
        out["samples"] = samples
    out["seconds"] = time.perf_counter() - start
    return out


def training_vocabulary() -> set[str]:
    """The lower-cased words of the training text (first 90% of Tiny Shakespeare)."""
    from shared.data import read_text
    from shared.dataset import train_val_split

    return set(words(train_val_split(read_text("tinyshakespeare"), 0.1)[0]))


def _number(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


def _cell(report: dict, key: str, text: bool = False) -> str:
    if key not in report:
        return "-"
    value = _number(report[key])
    if f"{key}_ci" in report:
        lo, hi = report[f"{key}_ci"]
        half = max(hi - report[key], report[key] - lo)
        value += f" ±{half:.3f}" if text else f" [{lo:.3f}, {hi:.3f}]"
    return value


def report_table(reports: dict[str, dict], text: bool = False) -> str:
    """One row per metric, one column per model, with 95% intervals: a Markdown
    table, or with ``text`` aligned columns and ± the larger half-width."""
    rows = []
    for key, (label, higher) in REPORT_ROWS.items():
        if any(key in r for r in reports.values()):
            label = f"{label} {'↑' if higher else '↓'}"
            rows.append([label] + [_cell(r, key, text) for r in reports.values()])
    head = ["metric", *reports]
    if text:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [head, *rows]
        return "\n".join(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in lines
        )  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|---|" + "---|" * len(reports)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """``python -m shared.evaluate [--model NAME_OR_DIR ...] [--quick] [--json F]``."""
    import argparse

    from shared.pretrained import COURSE_MODELS, load_course_model
    from shared.tasks import load_examples

    parser = argparse.ArgumentParser(
        prog="python -m shared.evaluate",
        description="Evaluate course models on every chapter-08 metric.",
    )
    parser.add_argument(
        "--model", nargs="+", default=list(COURSE_MODELS),
        help="course model names (base, sft, lora, dpo) or model folders",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small subsets (checks)")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    kwargs: dict = {}
    if args.quick:
        kwargs = dict(
            text=held_out_text()[:20_000],
            items={t: load_mc_items(t)[:40] for t in MC_TASKS},
            examples=load_examples("test")[::25],
            n_samples=4,
            max_new_tokens=40,
        )
    reports = {}
    for spec in args.model:
        if spec in COURSE_MODELS:
            model, tokenizer, _ = load_course_model(name=spec)
        else:
            model, tokenizer, _ = load_course_model(path=spec)
        reports[Path(spec).name] = evaluate_model(model, tokenizer, **kwargs)
        print(f"{spec}: {reports[Path(spec).name]['seconds']:.0f} s", flush=True)
    print(report_table(reports, text=True))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main()
