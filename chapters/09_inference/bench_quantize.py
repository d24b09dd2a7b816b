"""Weight-only quantization: the course's int8 and int4 against torchao and llama.cpp.

Part 1, the shipped 2.0M-parameter Shakespeare model in these forms, in one process:
fp32, bf16 (weights cast), the course's int8 (``quantize_model(bits=8)``), torchao's
``Int8WeightOnlyConfig``, PyTorch's legacy ``quantize_dynamic`` (int8 weights and
activations), the course's int4 in groups of 32, 64 and 192 (one group per row of
this 192-wide model), torchao's int4 (``IntxWeightOnlyConfig``, groups of 32: on a
CPU its one runnable int4 form keeps each code in a whole int8 byte) and, with
``requirements-llamacpp.txt`` installed, the course's GGUF export run by llama.cpp
in f32 and in Q4_0 (4-bit blocks of 32 filled with the course's int4). For each:
bytes in memory and as saved, the Linear weights' bytes, held-out loss and bits/char
over the whole validation split, how often its next-token argmax agrees with
fp32's, its greedy tokens against fp32's, and speed (a batch forward, and 100 greedy
tokens decoded with the KV cache), timed in interleaved rounds so machine load hits
every model alike; medians are reported.

Part 2, why the course's int4 scale: the relative error of all Linear weights of the
shipped model under three int4 rules, for three group sizes.

Part 3, GPT-2-124M's shape (random weights: speed does not depend on them): Linear
bytes and decode tokens/s of fp32, int8, int4 (ours: unpack, scale, matmul on every
call) and llama.cpp's Q4_0, whose fused kernel multiplies the packed bytes directly.

    python chapters/09_inference/bench_quantize.py [--rounds 5] [--threads 1]
        [--json PATH] [--quick]

Writes ``results/quantize.json`` (``--quick``: a seconds-long smoke run on part of
the data, no GPT-2 shape, writes only with ``--json``).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.generation import generate
from shared.gguf import export_gguf, gguf_tensors, llamacpp_greedy, load_llamacpp
from shared.loss import bits_per_char, evaluate_split
from shared.model import GPT, GPTConfig
from shared.pretrained import load_course_model, shakespeare_splits
from shared.quantize import (
    dequantize_groupwise,
    dynamic_int8,
    linear_weight_bytes,
    model_bytes,
    quantize_groupwise,
    quantize_model,
    to_bf16,
    torchao_int8,
)

RESULTS = Path(__file__).parent / "results" / "quantize.json"
PROMPT = "ROMEO:\n"
NEW_TOKENS = 100
FORWARD_BATCH = 8  # windows of the full context in the forward timing
GPT2_PROMPT, GPT2_NEW = 8, 16  # tokens, at GPT-2-124M's shape
NOTE = (
    "2 shared CPU cores, other engineers' jobs running (see the load averages): "
    "single timings vary by 20% or more; speeds are medians over interleaved rounds"
)
LINEAR_NAMES = ("attn_qkv", "attn_output", "ffn_up", "ffn_down", "output")
# printed columns: header, key, format
COURSE_COLUMNS = [
    ("MB", "MB", ".2f"),
    ("linear MB", "linear MB", ".3f"),
    ("bits/char", "bits_per_char", ".4f"),
    ("argmax = fp32", "argmax_agreement", ".3f"),
    ("greedy = fp32", "greedy_same_prefix", "d"),
    ("forward tok/s", "forward_tok_s", ",.0f"),
    ("decode tok/s", "decode_tok_s", ",.0f"),
]
GPT2_COLUMNS = [
    ("linear MB", "linear MB", ".1f"),
    ("decode tok/s", "decode_tok_s", ".2f"),
    ("vs fp32", "decode vs fp32", ".2f"),
]

# ------------------------------------------------------------------- the models


def torchao_int4(model: nn.Module, group_size: int = 32) -> nn.Module:
    """torchao's int4 weight-only, the form that runs on a CPU in torchao 0.18.

    ``Int4WeightOnlyConfig`` packs two codes a byte but needs CUDA (or the mslk
    kernels); ``IntxWeightOnlyConfig`` runs anywhere, one int4 code per int8 byte.
    """
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = copy.deepcopy(model)
    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(group_size)
    )
    quantize_(model, config)
    for m in model.modules():  # its weights are tensor subclasses: keep them as
        m.decode_copy = False  # they are (no fp32 decode copy, shared.attention)
    return model


class LlamaCpp:
    """A GGUF export run by llama.cpp, called like a model: ``(B, T)`` ids to logits."""

    def __init__(self, model: GPT, tokenizer, dtype: str, folder: Path, threads: int):
        self.config, self.dtype = model.config, dtype
        self.path = export_gguf(model, tokenizer, folder / f"{dtype}.gguf", dtype=dtype)
        self.tensors = dict(gguf_tensors(model, dtype))
        n_ctx = model.config.context_length
        self.llm = load_llamacpp(self.path, n_ctx, logits_all=True, threads=threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in x.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)])))
        return torch.stack(rows)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return llamacpp_greedy(self.path, ids, n, llm=self.llm)

    def sizes(self) -> dict[str, int]:
        linear = sum(
            len(data)
            for name, (_, _, data) in self.tensors.items()
            if name.split(".")[-2] in LINEAR_NAMES and name.endswith("weight")
        )
        if "output.weight" not in self.tensors:  # tied: the head is the embedding
            linear += len(self.tensors["token_embd.weight"][2])
        size = self.path.stat().st_size
        return {"bytes": size, "saved_bytes": size, "linear_bytes": linear}


def course_models(fp32: GPT, tokenizer, folder: Path, threads: int) -> dict:
    models = {
        "fp32": fp32,
        "bf16": to_bf16(fp32),
        "course int8": quantize_model(fp32, bits=8, group_size=None),
        "torchao int8": torchao_int8(fp32),
        "dynamic int8": dynamic_int8(fp32),
        "course int4 g32": quantize_model(fp32, bits=4, group_size=32),
        "course int4 g64": quantize_model(fp32, bits=4, group_size=64),
        "course int4 g192 (per row)": quantize_model(fp32, bits=4, group_size=192),
        "torchao int4 g32 (unpacked)": torchao_int4(fp32, 32),
    }
    for m in models["torchao int8"].modules():
        m.decode_copy = False  # as in torchao_int4
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows")
        return models
    for dtype in ("f32", "q4_0"):
        models[f"llama.cpp {dtype}"] = LlamaCpp(fp32, tokenizer, dtype, folder, threads)
    return models


def sizes(model) -> dict[str, int]:
    """Bytes in memory, as ``torch.save`` writes the state dict, of Linear weights."""
    if isinstance(model, LlamaCpp):
        return model.sizes()
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    counted, linear = model_bytes(model), linear_weight_bytes(model)
    # quantize_dynamic's weights live in packed C++ objects, no parameter or buffer
    for m in model.modules():
        if isinstance(m, DynamicLinear):
            w, b = m._weight_bias()
            weight = w.int_repr().nbytes + 8  # one fp32 scale + one int32 zero point
            counted += weight + (b.nbytes if b is not None else 0)
            linear += weight
    return {"bytes": counted, "saved_bytes": buf.tell(), "linear_bytes": linear}


# -------------------------------------------------------------------- measuring


@torch.no_grad()
def predictions(model, ids: np.ndarray, context: int, batch_size: int = 32) -> tuple:
    """Mean loss (nats/token) and argmax next tokens, non-overlapping windows (the
    windows of ``evaluate_split``, so the loss is the same number)."""
    n_win = (len(ids) - 1) // context
    x_all = torch.as_tensor(ids[: n_win * context]).view(n_win, context)
    y_all = torch.as_tensor(ids[1 : n_win * context + 1]).view(n_win, context)
    total, argmax = 0.0, []
    for i in range(0, n_win, batch_size):
        logits = model(x_all[i : i + batch_size]).float()
        y = y_all[i : i + batch_size]
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        argmax.append(logits.argmax(-1).flatten())
    return float(total) / y_all.numel(), torch.cat(argmax).numpy()


@torch.no_grad()
def time_forward(model, x: torch.Tensor) -> float:
    """Tokens per second of one forward pass over the batch ``x``."""
    start = time.perf_counter()
    model(x)
    return x.numel() / (time.perf_counter() - start)


def time_generate(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """New tokens per second of greedy decoding with a KV cache, and the tokens."""
    start = time.perf_counter()
    if isinstance(model, LlamaCpp):
        tokens = model.greedy(prompt, n)
    else:
        out = generate(model, torch.tensor([prompt]), n, temperature=0.0)
        tokens = out[0, len(prompt) :].tolist()
    return n / (time.perf_counter() - start), tokens


def interleaved(models: dict, rounds: int, task) -> dict[str, float]:
    """Median of ``task(model)`` per model, the models taking turns in each round."""
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(task(model))
    return {name: statistics.median(v) for name, v in samples.items()}


# ------------------------------------------------------------------ the parts


def part_course_model(fp32, tokenizer, val_ids, val_chars, args, folder) -> dict:
    models = course_models(fp32, tokenizer, folder, args.threads)
    T = fp32.config.context_length
    rows: dict[str, dict] = {}
    for name, model in models.items():
        loss, argmax = predictions(model, val_ids, T)
        reference = rows["fp32"]["argmax"] if rows else argmax
        rows[name] = sizes(model) | {
            "loss": loss,
            # the course's convention (chapter 04): the mean loss times all tokens
            "bits_per_char": bits_per_char(loss, len(val_ids), val_chars),
            "argmax_agreement": float((argmax == reference).mean()),
            "argmax": argmax,
        }
    # the shared evaluator must give fp32 the same loss as the single pass above
    assert abs(evaluate_split(fp32, val_ids) - rows["fp32"]["loss"]) < 1e-4

    x = torch.as_tensor(val_ids[: FORWARD_BATCH * T]).view(FORWARD_BATCH, T)
    prompt = tokenizer.encode(PROMPT)
    for name, model in models.items():  # warm-up, and the greedy tokens
        time_forward(model, x)
        rows[name]["greedy_tokens"] = time_generate(model, prompt, NEW_TOKENS)[1]
    forward = interleaved(models, args.rounds, lambda m: time_forward(m, x))
    decode = interleaved(
        models, args.rounds, lambda m: time_generate(m, prompt, NEW_TOKENS)[0]
    )
    ref = rows["fp32"]["greedy_tokens"]
    for name, r in rows.items():
        same = [a == b for a, b in zip(r.pop("greedy_tokens"), ref, strict=True)]
        del r["argmax"]
        # tokens before the first that differs (after it, the texts part ways)
        r["greedy_same_prefix"] = same.index(False) if False in same else len(same)
        r["greedy_agreement"] = sum(same) / len(same)  # position by position
        r["forward_tok_s"], r["decode_tok_s"] = forward[name], decode[name]
    return rows


def asymmetric_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """What int4 with a zero point gives: ``(q - zero) * scale`` over [min, max]."""
    g = w.reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-12) / 15
    zero = torch.round(-lo / scale)
    q = (torch.round(g / scale) + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(w.shape)


def part_weight_error(fp32: GPT) -> dict:
    """Relative error ||w_q - w|| / ||w|| over all Linear weights, per int4 rule."""
    weights = [m.weight.detach() for m in fp32.modules() if isinstance(m, nn.Linear)]
    rules = {
        "course: codes -8..7, signed scale (no zero point)": lambda w, g: (
            dequantize_groupwise(*quantize_groupwise(w, g))
        ),
        "plain symmetric: max|w| / 7, codes -7..7": _plain_symmetric,
        "asymmetric: zero point per group": asymmetric_int4,
    }
    norm = sum(float((w**2).sum()) for w in weights) ** 0.5
    return {
        rule: {
            f"group {g}": sum(float(((f(w, g) - w) ** 2).sum()) for w in weights) ** 0.5
            / norm
            for g in (32, 64, 192)
        }
        for rule, f in rules.items()
    }


def _plain_symmetric(w: torch.Tensor, group_size: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group_size)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7
    return (torch.round(g / scale) * scale).reshape(w.shape)


def part_gpt2_shape(args, folder: Path) -> dict:
    """Bytes and decode speed at GPT-2-124M's shape, random weights."""
    torch.manual_seed(0)
    fp32 = GPT(GPTConfig.gpt2("124M")).eval()
    models = {
        "fp32": fp32,
        "course int8": quantize_model(fp32, bits=8, group_size=None),
        "course int4 g32": quantize_model(fp32, bits=4, group_size=32),
        "course int4 g128": quantize_model(fp32, bits=4, group_size=128),
        "torchao int4 g32 (unpacked)": torchao_int4(fp32, 32),
    }
    try:
        from shared.tokenizer.gpt2 import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()  # GGUF needs a vocabulary of 50,257 tokens
        for dtype in ("f32", "q4_0"):
            models[f"llama.cpp {dtype}"] = LlamaCpp(
                fp32, tokenizer, dtype, folder, args.threads
            )
    except ImportError:
        pass
    prompt = torch.randint(0, fp32.config.vocab_size, (GPT2_PROMPT,)).tolist()
    for model in models.values():  # warm-up
        time_generate(model, prompt, 2)
    decode = interleaved(
        models,
        max(1, args.rounds // 2),
        lambda m: time_generate(m, prompt, GPT2_NEW)[0],
    )
    rows = {}
    for name, model in models.items():
        s = sizes(model) if isinstance(model, LlamaCpp) else {
            "bytes": model_bytes(model), "linear_bytes": linear_weight_bytes(model)
        }  # fmt: skip
        rows[name] = s | {"decode_tok_s": decode[name]}
        rows[name]["decode vs fp32"] = decode[name] / decode["fp32"]
    return rows


# ------------------------------------------------------------------------- main

LEGEND = {
    "bytes": "parameters + buffers (a tied tensor once); llama.cpp: the GGUF file",
    "saved_bytes": "torch.save of the state dict; llama.cpp: the GGUF file",
    "linear_bytes": "the Linear weights (quantized: codes + scales), no biases",
    "argmax_agreement": "next-token argmax equal to fp32's, all validation positions",
    "greedy_same_prefix": "greedy tokens before the first that differs from fp32's",
    "greedy_agreement": "greedy tokens equal to fp32's position by position",
    "decode_tok_s": "greedy tokens per second with the KV cache, median of rounds",
}


def ratios(result: dict) -> dict[str, float]:
    """The comparisons the chapter quotes, from the rows above."""
    rows, out = result["course_model"], {}
    fp32, int4 = rows["fp32"], rows["course int4 g32"]
    out["course: fp32 / int4 g32 linear bytes"] = (
        fp32["linear_bytes"] / int4["linear_bytes"]
    )
    out["course: int4 g32 bits/char, relative increase"] = (
        int4["bits_per_char"] / fp32["bits_per_char"] - 1
    )
    out["course: int4 g32 / fp32 decode speed"] = (
        int4["decode_tok_s"] / fp32["decode_tok_s"]
    )
    for name, r in result.get("gpt2_124m_shape", {}).items():
        out[f"gpt2-124m: {name} / fp32 decode speed"] = r["decode vs fp32"]
    return out


def machine() -> dict:
    import torchao

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
    info["torchao"] = torchao.__version__
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        info["llama_cpp_python"] = None
    return info


def print_table(rows: dict, columns: list[tuple[str, str, str]]) -> None:
    print("| model | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, r in rows.items():
        cells = [format(r[key], fmt) for _, key, fmt in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help=f"write here (default {RESULTS})")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    load_start, start = os.getloadavg(), time.perf_counter()

    fp32, tokenizer, _ = load_course_model(device="cpu")
    splits = shakespeare_splits(tokenizer)
    val_ids = np.asarray(splits["val_ids"], dtype=np.int64)
    val_chars = splits["val_chars"]
    if args.quick:  # a prefix, its characters in proportion
        val_chars = val_chars * (8 * 128 + 1) / len(val_ids)
        val_ids = val_ids[: 8 * 128 + 1]
    result: dict = {"settings": {
        "prompt": PROMPT, "new_tokens": NEW_TOKENS, "forward_batch": FORWARD_BATCH,
        "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "llama_cpp_threads": args.threads, "val_tokens": len(val_ids),
        "val_chars": val_chars, "gpt2_prompt_tokens": GPT2_PROMPT,
        "gpt2_new_tokens": GPT2_NEW, "quick": args.quick,
    }}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        result["course_model"] = part_course_model(
            fp32, tokenizer, val_ids, val_chars, args, Path(folder)
        )
        result["weight_error"] = part_weight_error(fp32)
        if not args.quick:
            result["gpt2_124m_shape"] = part_gpt2_shape(args, Path(folder))
    result["machine"] = machine() | {
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": time.perf_counter() - start,
    }
    result["note"] = NOTE
    result["legend"] = LEGEND
    result["ratios"] = ratios(result)

    mb = 1e6
    for r in result["course_model"].values():
        r["MB"], r["linear MB"] = r["bytes"] / mb, r["linear_bytes"] / mb
    print(f"\nshipped model; validation: {len(val_ids):,} tokens; {NEW_TOKENS} greedy "
          f"tokens from {PROMPT!r}; medians of {args.rounds} rounds")  # fmt: skip
    print_table(result["course_model"], COURSE_COLUMNS)
    print("\nrelative weight error, int4:")
    for rule, errs in result["weight_error"].items():
        print(f"  {rule}: " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    if "gpt2_124m_shape" in result:
        rows = result["gpt2_124m_shape"]
        for r in rows.values():
            r["linear MB"] = r["linear_bytes"] / mb
        print(f"\nGPT-2-124M shape, {GPT2_NEW} tokens after {GPT2_PROMPT}:")
        print_table(rows, GPT2_COLUMNS)
    print(f"\n{NOTE}; wall {result['machine']['wall_s']:.0f} s")
    path = args.json or (None if args.quick else RESULTS)
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
