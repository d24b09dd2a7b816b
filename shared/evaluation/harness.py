"""The course's evaluation tasks in EleutherAI's lm-evaluation-harness (``lm_eval``).

- ``write_task``: a list of ``MCItem`` as an lm-eval task folder (JSON lines + YAML),
  and ``write_generation_task``: chapter 07's instruction examples as a
  ``generate_until`` task scored by exact match, in a tokenizer's own prompt format
  (both from ``shared.evaluation.harness_tasks``).
- ``run_lm_eval``: ``lm_eval.simple_evaluate`` on those tasks, offline, for an
  exported Hugging Face folder (``shared.hf_export``) or any lm-eval ``LM``, zero- or
  few-shot; per-item log-likelihoods or responses come back in the items' order.
- ``CourseLM``: a course GPT as an lm-eval ``LM`` (no export needed).
- ``compare`` and ``compare_answers``: the course's own scorers
  (``shared.evaluation.score_mc``, ``task_accuracy``) against lm-eval, item by item.

lm-eval is imported only when used, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from shared.evaluation.harness_tasks import (
    instruction_prompt,
    write_generation_task,
    write_task,
)
from shared.evaluation.multiple_choice import MCResult
from shared.evaluation.scoring import encode_text, loglikelihood
from shared.generation import generate
from shared.model import evaluating
from shared.tasks import Example, check_answer

# re-exported: ``harness.write_task`` etc. (``CourseLM`` comes from ``__getattr__``)
__all__ = [
    "compare",
    "compare_answers",
    "instruction_prompt",
    "run_lm_eval",
    "write_generation_task",
    "write_task",
]


@contextlib.contextmanager
def _quiet_and_isolated() -> Iterator[None]:
    """Hide INFO chatter and library progress bars; keep the caller's random state.

    ``simple_evaluate`` reseeds ``random``, numpy and torch, which would silently
    change what a notebook samples afterwards. Warnings and errors still show.
    """
    import datasets
    import transformers

    # lm_eval's INFO lines; torchao (imported by transformers when installed) logs
    # the CUDA extensions a CPU build cannot load, and torch an Enum notice about it
    loggers = [
        logging.getLogger(n) for n in ("lm_eval", "torchao", "torch.utils._pytree")
    ]
    levels = [lg.level for lg in loggers]
    bars = (
        datasets.is_progress_bar_enabled(),
        transformers.logging.is_progress_bar_enabled(),
    )
    states = random.getstate(), np.random.get_state()
    asked = _AskedFewshot()  # num_fewshot was our argument: no need to warn about it
    logging.getLogger("lm_eval.evaluator").addFilter(asked)
    loggers[0].setLevel(logging.WARNING)
    for lg in loggers[1:]:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        logging.getLogger("lm_eval.evaluator").removeFilter(asked)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.logging.enable_progress_bar()
        random.setstate(states[0])
        np.random.set_state(states[1])


class _AskedFewshot(logging.Filter):
    """Drops lm-eval's warning that ``num_fewshot`` overrides the task's default."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Overwriting default num_fewshot")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep tqdm's bars (lm-eval draws its own) out of stderr, so a notebook's saved
    output stays short; whatever else was written to stderr is passed on after."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        rest = [
            line for line in re.split(r"[\r\n]", buffer.getvalue())
            if line.strip() and not _BAR.search(line)
        ]  # fmt: skip
        if rest:
            print("\n".join(rest), file=sys.stderr)


_BAR = re.compile(r"\d+%\||\d+/\d+ \[")  # "40%|████" or "12/30 [00:01<00:02"


def _number(value) -> float:
    # "N/A": a standard error lm-eval cannot estimate (a single item)
    return math.nan if value == "N/A" else float(value)


def _generation_result(task: dict, samples: list[dict]) -> dict:
    """Exact match and per-item responses of one ``generate_until`` task."""
    items = [
        {
            "id": s["doc"]["id"],
            "prompt": s["arguments"][0][0],  # as the model got it, shots included
            "response": s["filtered_resps"][0],  # stripped
            "target": s["target"],
            "exact_match": bool(s["exact_match"]),
        }
        for s in sorted(samples, key=lambda s: s["doc_id"])
    ]
    return {
        "exact_match": _number(task["exact_match,strip"]),
        "exact_match_stderr": _number(task["exact_match_stderr,strip"]),
        "items": items,
    }


def _task_result(task: dict, samples: list[dict]) -> dict:
    """Accuracies and per-item log-likelihoods of one task of lm-eval's results."""
    if "exact_match,strip" in task:
        return _generation_result(task, samples)
    items = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [ll for ll, _ in s["filtered_resps"]]
        chars = [len(c) for c in s["doc"]["choices"]]
        items.append(
            {
                "id": s["doc"]["id"],
                "loglikelihoods": lls,
                "greedy": [bool(g) for _, g in s["filtered_resps"]],
                "pred": int(np.argmax(lls)),
                # lm-eval's acc_norm divides by the choice's length in characters
                "pred_norm": int(np.argmax(np.array(lls) / chars)),
                "label": int(s["target"]),
            }
        )
    out: dict = {}
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        out[key] = _number(task[f"{key},none"])  # "none": lm-eval's default filter
    return out | {"items": items}


def run_lm_eval(
    model_args_or_lm,
    folder: str | Path,
    tasks: list[str],
    batch_size: int = 16,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    num_fewshot: int | None = None,
    fewshot_seed: int = 1234,
) -> dict:
    """Run lm-eval offline on the tasks ``write_task`` (or ``write_generation_task``)
    put in ``folder``.

    ``model_args_or_lm`` is a Hugging Face folder (lm-eval's "hf" model, float32) or
    an ``lm_eval.api.model.LM`` such as ``CourseLM`` (``batch_size`` and ``device``
    are then its own). Returns, per multiple-choice task, ``acc``, ``acc_norm``,
    their standard errors and ``items``: per item its id, log-likelihood and greedy
    flag of every choice, ``pred``, ``pred_norm`` and ``label``, in the file's
    order; per generation task ``exact_match``, its standard error and ``items``
    (id, prompt, stripped response, target, exact_match).
    ``num_fewshot`` solved examples precede each item: lm-eval draws them, seeded by
    ``fewshot_seed``, from the task's other items (our tasks have only a test
    split). ``progress=False`` keeps lm-eval's progress bars out of the output.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        # nothing here downloads; the hub libraries read these when first imported
        os.environ.setdefault(var, "1")
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    if isinstance(model_args_or_lm, LM):
        model, model_args = model_args_or_lm, None
    else:
        model = "hf"
        model_args = {"pretrained": str(model_args_or_lm), "dtype": "float32"}
    # only our folder: indexing lm-eval's ~15,000 built-in tasks takes seconds
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    bars = contextlib.nullcontext() if progress else _no_progress_bars()
    with _quiet_and_isolated(), bars:
        out = lm_eval.simple_evaluate(
            model,
            model_args=model_args,
            tasks=list(tasks),
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            num_fewshot=num_fewshot,
            fewshot_random_seed=fewshot_seed,
        )
    return {t: _task_result(out["results"][t], out["samples"][t]) for t in tasks}


# ------------------------------------------------------------------ the course LM


@torch.no_grad()
def _score_windows(
    model: torch.nn.Module, windows: Sequence[tuple[list[int], list[int]]], batch_size
) -> list[float]:
    """Summed log-probability of each ``(context ids, target ids)`` window's targets."""
    T = model.config.context_length
    device = next(model.parameters()).device
    with evaluating(model):
        out = []
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            group = [((c + t)[-(T + 1) :][:-1], t) for c, t in chunk]
            width = max(len(inp) for inp, _ in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            for row, (inp, _) in enumerate(group):
                x[row, : len(inp)] = torch.tensor(inp)  # right padding: causal, unread
            logp = torch.log_softmax(model(x.to(device)).float(), dim=-1).cpu()
            for row, (inp, target) in enumerate(group):
                lp = logp[row, len(inp) - len(target) : len(inp)]
                out.append(lp.gather(1, torch.tensor(target)[:, None]).sum().item())
    return out


@functools.cache
def _course_lm_class() -> type:
    """Define ``CourseLM`` once, on first use (it subclasses lm-eval's ``LM``)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class CourseLM(LM):
        """A course GPT and its tokenizer as an lm-eval model.

        ``lm_eval.simple_evaluate(CourseLM(model, tokenizer), ...)`` scores the
        course model directly; it gives the numbers of its Hugging Face export.
        """

        def __init__(self, model, tokenizer, batch_size: int = 32) -> None:
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            self.eot = tokenizer.special_tokens["<|endoftext|>"]

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            """``(log p(continuation | context), is greedy)`` per request."""
            pairs = [r.args for r in requests]
            return loglikelihood(self.model, self.tokenizer, pairs, self.batch_size)

        def loglikelihood_rolling(self, requests) -> list[float]:
            """Log-likelihood of each whole text after ``<|endoftext|>`` (perplexity).

            lm-eval's windows: consecutive blocks of ``context_length`` tokens, each
            scored once given the tokens before it in its window; the last, shorter
            block still sees a full window of earlier tokens.
            """
            T = self.model.config.context_length
            out = []
            for (text,) in (r.args for r in requests):
                ids = encode_text(self.tokenizer, text)
                rolling = get_rolling_token_windows(ids, self.eot, T, context_len=1)
                windows = [make_disjoint_window(w) for w in rolling]
                out.append(sum(_score_windows(self.model, windows, self.batch_size)))
            return out

        def generate_until(self, requests) -> list[str]:
            """Continue each context, cut at the first ``until`` string.

            Greedy unless ``do_sample`` is true (then ``temperature``, ``top_k``,
            ``top_p``); one request at a time, ``max_gen_toks`` tokens or up to the
            first ``until`` string that is one special token (``<|end|>``, else
            ``<|endoftext|>``), then cut at the first ``until`` string: simple, not
            fast.
            """
            out = []
            for context, kwargs in (r.args for r in requests):
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                until.append("<|endoftext|>")  # as lm-eval's HF model does
                special = self.tokenizer.special_tokens
                stop = next(special[u] for u in until if u in special)
                how: dict = {"temperature": 0}  # greedy
                if kwargs.get("do_sample"):  # lm-eval's HF model samples only then
                    how = {k: kwargs.get(k) for k in ("top_k", "top_p")}
                    how["temperature"] = float(kwargs.get("temperature", 1.0))
                ids = encode_text(self.tokenizer, context)
                ids = ids or [self.eot]  # an empty prompt starts a new text
                idx = torch.tensor([ids], device=next(self.model.parameters()).device)
                n_new = int(kwargs.get("max_gen_toks", 256))
                new = generate(self.model, idx, n_new, eos_id=stop, **how)
                text = self.tokenizer.decode(new[0, len(ids) :].tolist())
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return CourseLM


def __getattr__(name: str):
    # ``from shared.evaluation.harness import CourseLM`` builds the class on first use
    if name == "CourseLM":
        return _course_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -------------------------------------------------------------------- comparison


def compare(course: MCResult, harness_task_result: dict) -> dict:
    """How the course's scores and lm-eval's differ, on the items lm-eval scored."""
    index = {item.id: i for i, item in enumerate(course.items)}
    theirs = harness_task_result["items"]
    missing = [t["id"] for t in theirs if t["id"] not in index]
    if missing:
        raise ValueError(f"lm-eval scored items the course did not: {missing[:3]}")
    idx = [index[t["id"]] for t in theirs]
    diff = max(
        abs(a - b)
        for i, t in zip(idx, theirs, strict=True)
        for a, b in zip(course.loglikelihoods[i], t["loglikelihoods"], strict=True)
    )
    acc, acc_norm = course.correct()[idx].mean(), course.correct(True)[idx].mean()
    return {
        "items": len(idx),
        "pred_differs": int(sum(course.pred[idx] != [t["pred"] for t in theirs])),
        "pred_norm_differs": int(
            sum(course.pred_norm[idx] != [t["pred_norm"] for t in theirs])
        ),
        "max_abs_ll_diff": float(diff),
        # both are means of 0/1 values over the same items: equal, or not at all
        "acc_matches": bool(acc == harness_task_result["acc"]),
        "acc_norm_matches": bool(acc_norm == harness_task_result["acc_norm"]),
    }


def compare_answers(
    examples: Sequence[Example], responses: Sequence[str], harness_task_result: dict
) -> dict:
    """Chapter 07's exact match (``check_answer`` on ``task_accuracy``'s responses)
    against a ``generate_until`` run of ``write_generation_task(examples, ...)``.

    Returns both accuracies, how many items each scores right, and the ids of the
    items where the stripped responses differ and where the verdicts differ.
    """
    theirs = harness_task_result["items"]
    if [t["id"] for t in theirs] != [str(k) for k in range(len(theirs))]:
        raise ValueError("compare_answers needs the run's items in the file's order")
    if len(theirs) > len(examples):
        raise ValueError(f"lm-eval scored {len(theirs)} items, we have {len(examples)}")
    ours = [check_answer(e, r) for e, r in zip(examples, responses, strict=False)]
    ours = ours[: len(theirs)]
    text_differs = [
        t["id"] for r, t in zip(responses, theirs, strict=False)
        if r.strip() != t["response"]
    ]  # fmt: skip
    verdict_differs = [
        t["id"] for o, t in zip(ours, theirs, strict=True) if o != t["exact_match"]
    ]
    return {
        "items": len(theirs),
        "course_exact_match": float(np.mean(ours)),
        "harness_exact_match": float(np.mean([t["exact_match"] for t in theirs])),
        "response_differs": text_differs,
        "verdict_differs": verdict_differs,
    }
