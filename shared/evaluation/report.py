"""One report per model: every metric of chapter 8 with 95% intervals
(``evaluate_model``) and a table of several models side by side (``report_table``);
``python -m shared.evaluate`` prints it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from shared.data import read_text
from shared.dataset import train_val_split
from shared.evaluation.instructions import task_accuracy
from shared.evaluation.multiple_choice import (
    MC_TASKS,
    MCItem,
    chance_accuracy,
    held_out_text,
    load_mc_items,
    score_mc,
)
from shared.evaluation.scoring import encode_text, score_tokens
from shared.evaluation.statistics import (
    block_bootstrap_ci,
    bootstrap_ci,
    expected_calibration_error,
)
from shared.evaluation.text_metrics import generation_stats, sample_texts, words
from shared.loss import bits_per_byte, context_length_of, perplexity
from shared.tasks import check_answer, load_examples

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
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """Every metric of the chapter for one model, with 95% bootstrap intervals.

    Defaults: the held-out 10% of Tiny Shakespeare scored in windows of stride
    ``context_length // 2``, both multiple-choice tasks, the held-out instruction
    examples of chapter 07, and ``n_samples`` samples of ``max_new_tokens`` tokens at
    temperature 1 from ``prompt``. ``progress(stage, seconds)`` is called after each
    stage ("held-out text", each task's name, "instructions", "samples").
    """
    start = time.perf_counter()
    mark = [start]

    def done(stage: str) -> None:
        now = time.perf_counter()
        if progress is not None:
            progress(stage, now - mark[0])
        mark[0] = now

    text = held_out_text() if text is None else text
    items = {t: load_mc_items(t) for t in MC_TASKS} if items is None else items
    examples = load_examples("test") if examples is None else examples
    T = context_length_of(model)
    ids = encode_text(tokenizer, text)
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
    done("held-out text")
    for task, task_items in items.items():
        result = score_mc(model, tokenizer, task_items)
        for suffix, norm in (("acc", False), ("acc_norm", True)):
            correct = result.correct(norm)
            out[f"{task}_{suffix}"] = float(correct.mean())
            out[f"{task}_{suffix}_ci"] = list(bootstrap_ci(correct, seed=seed))
        out[f"{task}_chance"] = chance_accuracy(task_items)
        done(task)
    if examples:
        _, responses = task_accuracy(model, tokenizer, examples)
        right = [check_answer(e, r) for e, r in zip(examples, responses, strict=True)]
        out["instruct_acc"] = float(np.mean(right))
        out["instruct_acc_ci"] = list(bootstrap_ci(right, seed=seed))
        done("instructions")
    if n_samples:
        samples = sample_texts(
            model, tokenizer, prompt, n_samples, max_new_tokens, seed=seed
        )
        vocabulary = set(words(text)) | training_vocabulary()
        out.update(generation_stats(samples, vocabulary))
        out["samples"] = samples
        done("samples")
    out["seconds"] = time.perf_counter() - start
    return out


def evaluate_models(
    models: list[tuple[str, nn.Module, object]],
    say: Callable[[str], None],
    **kwargs,
) -> dict[str, dict]:
    """``evaluate_model`` for each ``(name, model, tokenizer)``, telling ``say`` what
    it will do, a line as each stage of each model ends, and after the first model
    an estimate of the time left. ``kwargs`` go to ``evaluate_model``."""
    say(workload([name for name, _, _ in models], **kwargs))
    reports: dict[str, dict] = {}
    start = time.perf_counter()
    for k, (name, model, tokenizer) in enumerate(models, 1):
        where = f"[{k}/{len(models)}] {name}"

        def stage_done(stage: str, seconds: float, where: str = where) -> None:
            say(f"{where}: {stage} {seconds:.0f} s")

        reports[name] = evaluate_model(model, tokenizer, **kwargs, progress=stage_done)
        say(f"{where}: done in {reports[name]['seconds']:.0f} s")
        if k == 1 and len(models) > 1:
            say(time_left(time.perf_counter() - start, len(models) - 1))
    return reports


def workload(
    names: list[str],
    *,
    text: str,
    items: dict[str, list[MCItem]],
    examples: list,
    n_samples: int,
    max_new_tokens: int,
    **_,
) -> str:
    """What ``evaluate_models`` is about to do, in one line."""
    tasks = ", ".join(f"{t} ({len(i)} items)" for t, i in items.items())
    return (
        f"evaluating {len(names)} model{'s' * (len(names) > 1)} ({', '.join(names)}) "
        f"on {len(text):,} held-out characters, {tasks}, {len(examples)} "
        f"instructions and {n_samples} samples of {max_new_tokens} tokens; the time "
        "left is estimated after the first model"
    )


def time_left(first_seconds: float, models_left: int) -> str:
    """The time left if every other model takes as long as the first."""
    left = first_seconds * models_left
    when = f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s"
    return f"about {when} left for {models_left} more model{'s' * (models_left > 1)}"


def training_vocabulary() -> set[str]:
    """The lower-cased words of the training text (first 90% of Tiny Shakespeare)."""
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
