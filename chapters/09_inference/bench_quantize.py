"""Weight-only int8 on the shipped model: the course's version against torchao's.

One table, one process, the shipped 2.0M-parameter Shakespeare model in five forms:
fp32, bf16 (weights cast), ``shared.quantize.quantize_int8``, torchao's
``Int8WeightOnlyConfig`` and PyTorch's legacy ``quantize_dynamic`` (int8 weights and
int8 activations, one scale per tensor). For each: bytes in memory and as saved,
the Linear weights' bytes, held-out loss and bits/char over the whole validation
split, how often its next-token argmax agrees with fp32's, and speed (a batch
forward, and 100 greedy tokens with ``shared.generation.generate``), timed in
interleaved rounds so machine load hits every model alike; medians are printed.

Run: python chapters/09_inference/bench_quantize.py [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.generation import generate
from shared.loss import bits_per_char, evaluate_split
from shared.pretrained import load_course_model, shakespeare_splits
from shared.quantize import (
    dynamic_int8,
    linear_weight_bytes,
    model_bytes,
    quantize_int8,
    to_bf16,
    torchao_int8,
)

PROMPT = "ROMEO:\n"
NEW_TOKENS = 100
FORWARD_BATCH = 8  # windows of the full context in the forward timing

# ----------------------------------------------------------------- the five models


def _dynamic_linears(model: nn.Module) -> list[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [m for m in model.modules() if isinstance(m, DynamicLinear)]


def sizes(model: nn.Module) -> dict[str, int]:
    """Bytes in memory, as ``torch.save`` writes the state dict, of Linear weights."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    counted, linear = model_bytes(model), linear_weight_bytes(model)
    # quantize_dynamic's weights live in packed C++ objects, no parameter or buffer
    for m in _dynamic_linears(model):
        w, b = m._weight_bias()
        weight = w.int_repr().nbytes + 8  # one fp32 scale + one int32 zero point
        counted += weight + (b.nbytes if b is not None else 0)
        linear += weight
    return {"bytes": counted, "saved_bytes": buf.tell(), "linear_bytes": linear}


# -------------------------------------------------------------------- measuring


@torch.no_grad()
def predictions(model: nn.Module, ids: np.ndarray, batch_size: int = 32) -> tuple:
    """Mean loss (nats/token) and argmax next tokens, non-overlapping windows.

    The windows are ``evaluate_split``'s, so the loss is the same number.
    """
    T = model.config.context_length
    n_win = (len(ids) - 1) // T
    x_all = torch.as_tensor(ids[: n_win * T]).view(n_win, T)
    y_all = torch.as_tensor(ids[1 : n_win * T + 1]).view(n_win, T)
    total, argmax = 0.0, []
    for i in range(0, n_win, batch_size):
        logits = model(x_all[i : i + batch_size]).float()
        y = y_all[i : i + batch_size]
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        argmax.append(logits.argmax(-1).flatten())
    return float(total) / y_all.numel(), torch.cat(argmax).numpy()


@torch.no_grad()
def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Tokens per second of one forward pass over the batch ``x``."""
    start = time.perf_counter()
    model(x)
    return x.numel() / (time.perf_counter() - start)


def time_generate(model: nn.Module, prompt: torch.Tensor) -> tuple[float, list]:
    """New tokens per second of greedy decoding, and the tokens."""
    start = time.perf_counter()
    out = generate(model, prompt, NEW_TOKENS, temperature=0.0)
    seconds = time.perf_counter() - start
    return NEW_TOKENS / seconds, out[0, prompt.size(1) :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fp32, tokenizer, _ = load_course_model(device="cpu")
    splits = shakespeare_splits(tokenizer)
    val_ids = np.asarray(splits["val_ids"], dtype=np.int64)
    val_chars = splits["val_chars"]
    models = {
        "fp32": fp32,
        "bf16": to_bf16(fp32),
        "course int8": quantize_int8(fp32),
        "torchao int8": torchao_int8(fp32),
        "dynamic int8": dynamic_int8(fp32),
    }
    import torchao

    print(
        f"torch {torch.__version__}, torchao {torchao.__version__}, "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )

    rows: dict[str, dict] = {}
    reference = None
    for name, model in models.items():
        loss, argmax = predictions(model, val_ids)
        reference = argmax if reference is None else reference
        rows[name] = sizes(model) | {
            "loss": loss,
            # the course's convention (chapter 04): the mean loss times all tokens
            "bits_per_char": bits_per_char(loss, len(val_ids), val_chars),
            "agreement": float((argmax == reference).mean()),
        }
    # the shared evaluator must give fp32 the same loss as the single pass above
    assert abs(evaluate_split(fp32, val_ids) - rows["fp32"]["loss"]) < 1e-4

    T = fp32.config.context_length
    x = torch.as_tensor(val_ids[: FORWARD_BATCH * T]).view(FORWARD_BATCH, T)
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    speed = {name: {"forward": [], "generate": []} for name in models}
    for name, model in models.items():  # warm-up, and the greedy texts
        time_forward(model, x)
        rows[name]["greedy_tokens"] = time_generate(model, prompt)[1]
    for _ in range(args.rounds):
        for name, model in models.items():
            speed[name]["forward"].append(time_forward(model, x))
            speed[name]["generate"].append(time_generate(model, prompt)[0])
    for name in models:
        rows[name]["forward_tok_s"] = statistics.median(speed[name]["forward"])
        rows[name]["generate_tok_s"] = statistics.median(speed[name]["generate"])
        greedy = rows[name]["greedy_tokens"]
        same = [
            a == b for a, b in zip(greedy, rows["fp32"]["greedy_tokens"], strict=True)
        ]
        rows[name]["greedy_same_prefix"] = (
            same.index(False) if False in same else len(same)
        )

    mb = 1e6
    print(
        f"\nvalidation split: {len(val_ids):,} tokens, {val_chars:,} characters; "
        f"speed: forward of {FORWARD_BATCH}x{T} tokens, {NEW_TOKENS} greedy tokens "
        f"from {PROMPT!r}; medians of {args.rounds} rounds\n"
    )
    head = (
        "| model | MB | saved MB | linear MB | loss | bits/char | "
        "argmax = fp32 | greedy = fp32 | forward tok/s | generate tok/s |"
    )
    print(head + "\n|" + "---|" * head.count(" | ") + "---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bytes'] / mb:.2f} | {r['saved_bytes'] / mb:.2f} | "
            f"{r['linear_bytes'] / mb:.2f} | {r['loss']:.5f} | "
            f"{r['bits_per_char']:.4f} | {r['agreement']:.4f} | "
            f"{r['greedy_same_prefix']}/{NEW_TOKENS} | {r['forward_tok_s']:,.0f} | "
            f"{r['generate_tok_s']:,.0f} |"
        )
    print(
        "\nMB: parameters + buffers (a tied tensor once); saved: torch.save of the "
        "state dict; greedy = fp32: tokens before the first that differs"
    )
    if args.json:
        for r in rows.values():
            del r["greedy_tokens"]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
