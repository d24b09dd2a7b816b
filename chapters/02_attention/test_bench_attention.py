"""The chapter 02 benchmark runs, agrees, and sees the T x T score tensors in memory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import benchmark, format_table, ratios, score_tensor_bytes  # noqa: E402


def test_score_tensor_bytes_is_quadratic():
    assert score_tensor_bytes(2, 3, 10) == 2 * 3 * 100 * 4
    assert score_tensor_bytes(1, 1, 20) == 4 * score_tensor_bytes(1, 1, 10)


def test_benchmark_memory_explicit_quadratic_fused_not():
    results = benchmark([256], batch=1, heads=4, head_dim=32, repeats=1)
    by_impl = {r.impl: r for r in results}
    score = score_tensor_bytes(1, 4, 256)
    # explicit keeps at least the scores and the weights alive at once
    assert by_impl["explicit"].peak_bytes >= 2 * score
    # the fused kernel never allocates a full (T, T) tensor
    assert by_impl["fused"].peak_bytes < score
    table = format_table(ratios(results))
    assert table.splitlines()[1].split()[0] == "256"
