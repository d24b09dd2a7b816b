"""The diagrams of chapter 2, drawn from the tensors the chapter computes.

Every matrix is drawn as a grid with one cell per entry, so a drawn shape is the
tensor's shape: ``qkv_flow`` (the data flow of one causal attention head),
``causal_mask_grid`` (which keys each query may see) and ``head_split`` (how a
``(T, d)`` tensor becomes ``h`` heads and back, with the numbers written in).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib import colors
from matplotlib.patches import FancyArrowPatch, Rectangle

from shared.plotting import HEATMAP_CMAP, format_token

MASKED = "#d9d9d9"  # blocked (future) entries
HEAD_COLOURS = sns.color_palette("colorblind", 4)


def _grid(
    ax,
    arr,
    x0,
    y0,
    *,
    cmap=None,
    norm=None,
    masked=None,
    fill=None,
    text=None,
    fontsize=7,
):
    """Draw ``arr`` (rows, cols), its top-left corner at (x0, y0); y points down."""
    rows, cols = arr.shape
    for i in range(rows):
        for j in range(cols):
            if masked is not None and masked[i, j]:
                face = MASKED
            elif fill is not None:
                face = fill[i][j]
            else:
                face = cmap(norm(arr[i, j]))
            ax.add_patch(Rectangle((x0 + j, y0 + i), 1, 1, fc=face, ec="white", lw=0.8))
            if text is not None:
                ax.text(
                    x0 + j + 0.5,
                    y0 + i + 0.52,
                    text[i][j],
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                )
    ax.add_patch(Rectangle((x0, y0), cols, rows, fc="none", ec="black", lw=0.8))


def _arrow(ax, start, end, label=None, offset=(0, -0.4), rad=0.0):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=10,
            lw=1.0,
            color="black",
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=2,
            shrinkB=2,
        )
    )
    if label:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, label, ha="center", va="bottom", fontsize=9)


def _label(ax, x, y, name, shape, fontsize=10, shape_size=8):
    # the y axis points down: the name sits above the shape, both above the grid
    ax.text(x, y - 0.8, name, ha="center", va="bottom", fontsize=fontsize)
    ax.text(x, y, shape, ha="center", va="bottom", fontsize=shape_size, color="#444")


def qkv_flow(x, q, k, v, scores, weights, out, tokens: Sequence[str]) -> plt.Figure:
    """One causal head's data flow, each matrix a grid coloured by its real values."""
    arrs = [np.asarray(a, dtype=float) for a in (x, q, k, v, scores, weights, out)]
    x, q, k, v, scores, weights, out = arrs
    t, d_in = x.shape
    d_k, d_v = q.shape[1], v.shape[1]
    future = np.triu(np.ones((t, t), dtype=bool), 1)
    lim = max(np.abs(a).max() for a in (x, q, k, v, scores, out))
    signed = colors.TwoSlopeNorm(0, -lim, lim)
    vlag = sns.color_palette("vlag", as_cmap=True)
    w_cmap = sns.color_palette(HEATMAP_CMAP, as_cmap=True)
    # at most the printed page's width (6.3 in), so the text prints at its drawn size
    fig, ax = plt.subplots(figsize=(6.1, 3.6), layout="constrained")
    gap = t + 3  # vertical distance between the rows of Q, K and V
    xq = d_in + 5.5
    top = {"Q": 0.0, "K": gap, "V": 2 * gap}
    _grid(ax, x, 0, gap, cmap=vlag, norm=signed)
    for row, tok in enumerate(tokens):
        ax.text(
            -0.3,
            gap + row + 0.5,
            format_token(tok),
            ha="right",
            va="center",
            fontsize=8,
        )
    _label(ax, d_in / 2, gap - 0.3, "$x$", f"({t}, {d_in})", fontsize=11)
    for name, m in zip("QKV", (q, k, v), strict=True):
        y = top[name]
        _grid(ax, m, xq, y, cmap=vlag, norm=signed)
        _label(ax, xq + d_k / 2, y - 0.3, f"${name}$", f"({t}, {m.shape[1]})", 11)
        _arrow(ax, (d_in, gap + t / 2), (xq, y + t / 2))
        # the weight matrix's label sits beside the arrow's head, clear of the line
        below = name == "V"
        ax.text(
            xq - 0.4,
            y + t / 2 + (0.5 if below else -0.6),
            rf"$\cdot W_{name.lower()}$",  # its shape is in the caption
            ha="right",
            va="top" if below else "bottom",
            fontsize=10.5,  # its subscript prints at 7 pt or more
        )
    # the score pipeline runs along the row of K
    xs = xq + d_k + 4.5
    step = 4.8  # from one stage to the next: room for the stage names
    stages = [
        (scores, None, r"$S = QK^\top/\sqrt{d_k}$", signed, vlag),
        (scores, future, r"masked $S$", signed, vlag),
        (weights, future, r"$A = \mathrm{softmax}(S)$", None, w_cmap),
    ]
    y = gap
    x0 = xs
    for i, (m, masked, name, norm, cmap) in enumerate(stages):
        norm = norm or colors.Normalize(0, 1)
        _grid(ax, m, x0, y, cmap=cmap, norm=norm, masked=masked)
        _label(ax, x0 + t / 2, y - 0.3, name, f"({t}, {t})", fontsize=11)
        if i + 1 < len(stages):
            _arrow(ax, (x0 + t, y + t / 2), (x0 + t + step, y + t / 2))
        x0 += t + step
    _arrow(ax, (xq + d_k, top["Q"] + t / 2), (xs, y + 1), rad=-0.2)
    _arrow(ax, (xq + d_k, y + t / 2), (xs, y + t / 2))
    # the output: weights times values
    xo = x0 - step + 2.5
    yo = 2 * gap
    _grid(ax, out, xo, yo, cmap=vlag, norm=signed)
    ax.text(  # below the grid: the arrow from A comes in from above
        xo + d_v / 2, yo + t + 0.4, f"$Z = AV$  ({t}, {d_v})", ha="center", va="top"
    )
    _arrow(ax, (x0 - step - t / 2, y + t), (xo + d_v / 2, yo), rad=0.0)
    _arrow(
        ax, (xq + d_k, yo + t / 2), (xo, yo + t / 2), r"$A \cdot V$", offset=(0, -0.2)
    )
    ax.set_xlim(-2.2, xo + d_v + 0.5)
    ax.set_ylim(2 * gap + t + 2.0, -2.2)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def causal_mask_grid(tokens: Sequence[str], blocked) -> plt.Figure:
    """Which key (column) each query (row) may attend to: allowed, or -inf."""
    blocked = np.asarray(blocked, dtype=bool)
    t = len(tokens)
    allowed = colors.to_rgba(HEAD_COLOURS[2], 0.55)
    fill = [[MASKED if blocked[i, j] else allowed for j in range(t)] for i in range(t)]
    text = [
        [
            r"$-\infty$" if blocked[i, j] else ("self" if i == j else "✓")
            for j in range(t)
        ]
        for i in range(t)
    ]
    fig, ax = plt.subplots(figsize=(4.6, 4.0), layout="constrained")
    _grid(ax, blocked, 0, 0, fill=fill, text=text)
    labels = [f"{i} {format_token(tok)}" for i, tok in enumerate(tokens)]
    ax.set_xticks(np.arange(t) + 0.5, labels, rotation=90, fontsize=9)
    ax.set_yticks(np.arange(t) + 0.5, labels, fontsize=9)
    ax.tick_params(length=0)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("key $j$ (attended-to token)")
    ax.set_ylabel("query $i$ (attending token)")
    ax.set_xlim(0, t)
    ax.set_ylim(t, 0)
    ax.set_aspect("equal")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.grid(False)
    n_allowed = int((~blocked).sum())
    ax.set_title(
        f"query $i$ sees key $j$ only if $j \\leq i$: {n_allowed} of {t * t} pairs",
        fontsize=10,
        pad=8,
        y=-0.12,
    )
    return fig


def _numbers(m):
    return [[f"{v:g}" for v in row] for row in np.asarray(m)]


def head_split(x, split, heads, out_heads, merged) -> plt.Figure:
    """(T, d) -> view (T, h, d/h) -> transpose (h, T, d/h) -> attend -> (T, d)."""
    x, split, heads, out_heads, merged = (
        np.asarray(a, dtype=float) for a in (x, split, heads, out_heads, merged)
    )
    t, d = x.shape
    h, dh = split.shape[1], split.shape[2]
    col_colour = [colors.to_rgba(HEAD_COLOURS[j // dh], 0.35) for j in range(d)]
    fig, ax = plt.subplots(figsize=(6.1, 2.4), layout="constrained")
    x0 = 0.0
    panels = []

    def flat(m, title, shape):  # a (T, d) matrix, columns coloured by head
        nonlocal x0
        fill = [[col_colour[j] for j in range(d)] for _ in range(t)]
        _grid(ax, m, x0, 0, fill=fill, text=_numbers(m), fontsize=9)
        panels.append((x0, x0 + d))
        _label(ax, x0 + d / 2, -0.3, title, shape, fontsize=9)
        x0 += d

    def grouped(m, title, shape):  # (T, h, d/h): each row split into h groups
        nonlocal x0
        for g in range(h):
            fill = [[colors.to_rgba(HEAD_COLOURS[g], 0.35)] * dh for _ in range(t)]
            x_g = x0 + g * (dh + 0.5)
            _grid(ax, m[:, g], x_g, 0, fill=fill, text=_numbers(m[:, g]), fontsize=9)
        width = h * dh + (h - 1) * 0.5
        panels.append((x0, x0 + width))
        _label(ax, x0 + width / 2, -0.3, title, shape, fontsize=9)
        x0 += width

    def stacked(m, title, shape):  # (h, T, d/h): one matrix per head, stacked
        nonlocal x0
        for g in range(h):
            fill = [[colors.to_rgba(HEAD_COLOURS[g], 0.35)] * dh for _ in range(t)]
            y = g * (t + 0.6)
            _grid(ax, m[g], x0, y, fill=fill, text=_numbers(m[g]), fontsize=9)
            ax.text(
                x0 + dh + 0.2,
                y + t / 2,
                f"head {g}",
                va="center",
                fontsize=8,
                rotation=90,
            )
        panels.append((x0, x0 + dh + 0.8))
        _label(ax, x0 + dh / 2, -0.3, title, shape, fontsize=9)
        x0 += dh + 0.8

    step = 2.4
    flat(x, "$x$", f"({t}, {d})")
    steps = [
        (grouped, split, "view", f"({t}, {h}, {d // h})"),
        (stacked, heads, "transpose", f"({h}, {t}, {dh})"),
        (stacked, out_heads, "attend", f"({h}, {t}, {dh})"),
        (flat, merged, "merge", f"({t}, {d})"),
    ]
    for draw, m, title, shape in steps:
        start = x0
        x0 += step
        draw(m, title, shape)
        _arrow(ax, (start + 0.1, t / 2), (start + step - 0.1, t / 2))
    ax.set_xlim(-0.3, x0 + 0.3)
    ax.set_ylim(h * (t + 0.6) + 0.1, -2.3)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig
