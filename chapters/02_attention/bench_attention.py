"""Explicit attention vs PyTorch's fused kernel: time and memory as the context grows.

Run ``python chapters/02_attention/bench_attention.py`` to print a table of ratios, or
import :func:`benchmark` (the chapter 02 notebook does). Both implementations get the
same causal query, key and value tensors of shape ``(batch, heads, T, head_dim)``, the
shape every attention layer in the course works with. Timings are medians of repeats,
measured side by side in one run; on a shared machine only the ratios mean much.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from shared.memory import peak_memory_bytes

BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


Tensor = torch.Tensor


def explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention written out: it materialises the (T, T) scores of every head."""
    t = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return weights @ v


def fused_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention by PyTorch's fused kernel (flash-style on CPU and CUDA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "explicit": explicit_attention,
    "fused": fused_attention,
}


@dataclass
class Result:
    """One measurement: implementation, context length, median seconds, peak bytes."""

    impl: str
    T: int
    seconds: float
    peak_bytes: int
    score_bytes: int  # one (B, H, T, T) tensor, computed analytically


def score_tensor_bytes(
    batch: int, heads: int, t: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of one (batch, heads, T, T) score or weight tensor: grows as T squared."""
    return batch * heads * t * t * BYTES[dtype]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each function (at least ``repeats`` calls), in blocks.

    Blocks alternate so a burst of load from elsewhere hits every function alike;
    calls inside a block run back to back, because switching between kernels on
    every call makes their thread pools fight over the cores (4 ms stalls on 2 cores).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = min(3, repeats)
    for r in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()  # warm-up: first-call allocations, thread-pool wake-up
            _sync(device)
            warm = time.perf_counter() - start
            calls = repeats // rounds + (r < repeats % rounds)
            # fast calls are repeated more (up to ~20 ms a block): one stall of the
            # scheduler then cannot become the median
            calls = max(calls, min(50, int(0.02 / max(warm, 1e-6))))
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def benchmark(
    context_lengths: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    threads: int | None = None,
    backward: bool = False,
) -> list[Result]:
    """Time (median of ``repeats``) and peak memory of both implementations at each T.

    By default the forward pass without autograd (the inference cost); with
    ``backward`` a forward and backward pass, as in training, where the explicit
    version must also keep its weights for the gradient. Outputs are checked to
    agree before anything is timed; all timings run before any memory profiling,
    because the profiler disturbs the timings that follow it. ``threads`` sets
    PyTorch's CPU threads for the run (one thread is the steadiest on a busy machine:
    no thread waits for another that the OS has not scheduled yet).
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.set_grad_enabled(backward):
            return _benchmark(
                context_lengths,
                batch,
                heads,
                head_dim,
                repeats,
                device,
                dtype,
                seed,
                backward,
            )
    finally:
        torch.set_num_threads(saved_threads)


def _benchmark(
    context_lengths: Sequence[int],
    batch: int,
    heads: int,
    head_dim: int,
    repeats: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    backward: bool,
) -> list[Result]:
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    calls: dict[int, dict[str, Callable[[], Tensor]]] = {}
    for t in context_lengths:
        shape = (batch, heads, t, head_dim)
        q, k, v = (
            torch.randn(shape, generator=gen, dtype=dtype).to(device) for _ in range(3)
        )
        for z in (q, k, v):
            z.requires_grad_(backward)
        torch.testing.assert_close(
            explicit_attention(q, k, v), fused_attention(q, k, v), rtol=1e-4, atol=1e-4
        )
        step = _forward_backward if backward else _forward
        calls[t] = {
            name: partial(step, impl, q, k, v) for name, impl in IMPLEMENTATIONS.items()
        }
    seconds = {t: median_seconds(fns, repeats, device) for t, fns in calls.items()}
    results = []
    for t, fns in calls.items():
        for name, fn in fns.items():
            results.append(
                Result(
                    impl=name,
                    T=t,
                    seconds=seconds[t][name],
                    peak_bytes=peak_memory_bytes(fn, device),
                    score_bytes=score_tensor_bytes(batch, heads, t, dtype),
                )
            )
    return results


def _forward(impl: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return impl(q, k, v)


def _forward_backward(
    impl: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor
) -> Tensor:
    out = impl(q, k, v)
    out.sum().backward()  # gradients land in q.grad, k.grad, v.grad
    q.grad = k.grad = v.grad = None
    return out.detach()


def ratios(results: Sequence[Result]) -> list[dict[str, float]]:
    """Per context length: explicit / fused, for time and for peak memory."""
    by_key = {(r.impl, r.T): r for r in results}
    rows = []
    for t in sorted({r.T for r in results}):
        ex, fu = by_key[("explicit", t)], by_key[("fused", t)]
        rows.append(
            {
                "T": t,
                "explicit_ms": ex.seconds * 1e3,
                "fused_ms": fu.seconds * 1e3,
                "time_ratio": ex.seconds / fu.seconds,
                "score_MiB": ex.score_bytes / 2**20,
                "explicit_peak_MiB": ex.peak_bytes / 2**20,
                "fused_peak_MiB": fu.peak_bytes / 2**20,
                "memory_ratio": ex.peak_bytes / max(fu.peak_bytes, 1),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, float]]) -> str:
    """The ratio rows as an aligned text table."""
    header = (
        f"{'T':>6} {'explicit ms':>12} {'fused ms':>10} {'time x':>7} "
        f"{'scores MiB':>11} {'expl. peak MiB':>15} {'fused peak MiB':>15} {'mem x':>7}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['T']:>6} {r['explicit_ms']:>12.2f} {r['fused_ms']:>10.2f} "
            f"{r['time_ratio']:>7.1f} {r['score_MiB']:>11.2f} "
            f"{r['explicit_peak_MiB']:>15.2f} {r['fused_peak_MiB']:>15.2f} "
            f"{r['memory_ratio']:>7.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    """Command line: print the table of explicit-vs-fused ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--T", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048]
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument(
        "--backward", action="store_true", help="time forward + backward (training)"
    )
    args = parser.parse_args()
    results = benchmark(
        args.T,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats,
        device=args.device,
        threads=args.threads,
        backward=args.backward,
    )
    print(
        f"causal attention {'forward+backward' if args.backward else 'forward'}, "
        f"batch={args.batch} heads={args.heads} "
        f"head_dim={args.head_dim} float32 on {args.device}, "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} "
        f"threads; "
        f"median of {args.repeats} repeats"
    )
    print(format_table(ratios(results)))


if __name__ == "__main__":
    main()
