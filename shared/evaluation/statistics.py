"""Uncertainty and calibration: bootstrap intervals (plain, paired on the same items,
and in blocks for correlated per-token values), McNemar's exact test for two models
scored on the same items, reliability bins and the expected calibration error."""

from __future__ import annotations

import math

import numpy as np


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


def mcnemar(a_correct, b_correct) -> dict[str, float]:
    """McNemar's exact test: do models A and B differ in accuracy on the same items?

    Only the *discordant* items carry information: ``b`` items that A gets right and
    B wrong, ``c`` the other way round. If the two models were equally good, each
    discordant item would be A's with probability 1/2, so ``b`` is Binomial(b + c,
    1/2); the two-sided p-value is the probability of a split at least as uneven.
    Items both get right (or both wrong) say nothing about the difference, which is
    why a paired test sees effects that two separate intervals hide.
    """
    a = np.asarray(a_correct, dtype=bool)
    b_ = np.asarray(b_correct, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError("paired results must have the same shape")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {
        "a_only": b,
        "b_only": c,
        "difference": (b - c) / len(a),
        "p_value": min(1.0, 2 * tail),
    }


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
