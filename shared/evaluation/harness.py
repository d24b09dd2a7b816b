"""The course's evaluation tasks in EleutherAI's lm-evaluation-harness (``lm_eval``).

- ``write_task``: a list of ``MCItem`` as an lm-eval task folder (JSON lines + YAML).
- ``run_lm_eval``: ``lm_eval.simple_evaluate`` on those tasks, offline, for an
  exported Hugging Face folder (``shared.hf_export``) or any lm-eval ``LM``; per-item
  log-likelihoods come back in the items' order.
- ``CourseLM``: a course GPT as an lm-eval ``LM`` (no export needed).
- ``compare``: the course's own scorer (``shared.evaluation.score_mc``) against
  lm-eval, item by item.

lm-eval is imported only when used, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
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

from shared.evaluation.multiple_choice import MCItem, MCResult
from shared.evaluation.scoring import encode_text, loglikelihood
from shared.generation import generate
from shared.model import evaluating

# lm-eval's YAML for a course task: the context is the prompt as it stands and each
# choice is appended to it as it stands (target_delimiter ""): contexts already end in
# "\n", and lm-eval's default delimiter " " would change every continuation.
# cache_dir keeps datasets' Arrow cache beside the task, not in the home folder.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(items: Sequence[MCItem], folder: str | Path, name: str) -> Path:
    """Write ``{folder}/{name}.jsonl`` and the task's ``{folder}/{name}.yaml``."""
    folder = Path(folder).resolve()  # datasets reads data_files relative to the cwd
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(dataclasses.asdict(item), ensure_ascii=False) for item in items]
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    # json.dumps quotes the paths: a JSON string is a valid YAML scalar
    yaml = TASK_YAML.format(
        name=name, data=json.dumps(str(data)), cache=json.dumps(str(folder / ".cache"))
    )
    (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return folder


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
    loggers[0].setLevel(logging.WARNING)
    for lg in loggers[1:]:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.logging.enable_progress_bar()
        random.setstate(states[0])
        np.random.set_state(states[1])


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


def _task_result(task: dict, samples: list[dict]) -> dict:
    """Accuracies and per-item log-likelihoods of one task of lm-eval's results."""
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
        value = task[f"{key},none"]  # "none": the name of lm-eval's default filter
        # "N/A": a standard error lm-eval cannot estimate (a single item)
        out[key] = math.nan if value == "N/A" else float(value)
    return out | {"items": items}


def run_lm_eval(
    model_args_or_lm,
    folder: str | Path,
    tasks: list[str],
    batch_size: int = 16,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Run lm-eval offline on the tasks ``write_task`` put in ``folder``.

    ``model_args_or_lm`` is a Hugging Face folder (lm-eval's "hf" model, float32) or
    an ``lm_eval.api.model.LM`` such as ``CourseLM`` (``batch_size`` and ``device``
    are then its own). Returns, per task, ``acc``, ``acc_norm``, their standard
    errors and ``items``: per item its id, log-likelihood and greedy flag of every
    choice, ``pred``, ``pred_norm`` and ``label``, in the file's order.
    ``progress=False`` keeps lm-eval's progress bars out of the output.
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
            ``top_p``); one request at a time, always ``max_gen_toks`` tokens (or
            up to ``<|endoftext|>``) before cutting: simple, not fast.
            """
            out = []
            for context, kwargs in (r.args for r in requests):
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                until.append("<|endoftext|>")  # as lm-eval's HF model does
                how: dict = {"temperature": 0}  # greedy
                if kwargs.get("do_sample"):  # lm-eval's HF model samples only then
                    how = {k: kwargs.get(k) for k in ("top_k", "top_p")}
                    how["temperature"] = float(kwargs.get("temperature", 1.0))
                ids = encode_text(self.tokenizer, context)
                ids = ids or [self.eot]  # an empty prompt starts a new text
                idx = torch.tensor([ids], device=next(self.model.parameters()).device)
                n_new = int(kwargs.get("max_gen_toks", 256))
                new = generate(self.model, idx, n_new, eos_id=self.eot, **how)
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
