"""The course's house style and its one attention-heatmap helper (seaborn)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

# light = little attention, dark = much; prints well in greyscale
HEATMAP_CMAP = "rocket_r"


def use_book_style(vector: bool = True) -> None:
    """Apply the house style; in Jupyter also emit PDF beside PNG (vector figures)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "axes.titlesize": 12,
            "axes.titleweight": "bold",
            "axes.labelsize": 11,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
            "figure.titlesize": 13,
            "figure.titleweight": "bold",
            "pdf.fonttype": 42,  # embed TrueType so text in figures stays text
            "svg.fonttype": "none",
        }
    )
    if vector:
        _inline_formats("png", "pdf")


def _inline_formats(*formats: str) -> None:
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats(*formats)


def format_token(token: str) -> str:
    """Make a token printable on an axis: show spaces, newlines and tabs."""
    return (
        token.replace("\r", "\\r")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace(" ", "␣")
    )


def _to_numpy(weights) -> np.ndarray:
    if hasattr(weights, "detach"):  # a torch tensor, on any device
        weights = weights.detach().float().cpu().numpy()
    arr = np.asarray(weights, dtype=float)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            "attention weights must be (T_q, T_k) or (heads, T_q, T_k); "
            f"got {arr.shape}"
        )
    return arr


def attention_heatmap(
    weights,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    *,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
    ncols: int = 4,
    cell_size: float | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    cmap: str = HEATMAP_CMAP,
    annot: bool = False,
    hide_masked: bool = True,
    cbar_label: str = "attention weight",
    max_width: float = 6.2,
    max_height: float = 6.6,
) -> plt.Figure:
    """Draw one or several heads' attention matrices side by side with one colour bar.

    ``weights``: array or tensor of shape ``(T_q, T_k)`` or ``(heads, T_q, T_k)``;
    rows are queries (the token that attends), columns are keys (the token attended to).
    Entries that are exactly zero above the diagonal (causal mask) are left blank
    when ``hide_masked`` is true, so the triangle of allowed positions stands out.
    The figure is at most ``max_width`` x ``max_height`` inches, the book's text block,
    so it prints at full size and its 8-pt labels stay 8 pt on paper; tick labels are
    thinned to what fits.
    """
    arr = _to_numpy(weights)
    n_heads, t_q, t_k = arr.shape
    if query_tokens is not None and len(query_tokens) != t_q:
        raise ValueError(f"{len(query_tokens)} query tokens for {t_q} rows")
    if key_tokens is None:
        key_tokens = query_tokens if (query_tokens is not None and t_q == t_k) else None
    if key_tokens is not None and len(key_tokens) != t_k:
        raise ValueError(f"{len(key_tokens)} key tokens for {t_k} columns")
    if titles is not None and len(titles) != n_heads:
        raise ValueError(f"{len(titles)} titles for {n_heads} heads")
    ylabels = (
        [format_token(t) for t in query_tokens] if query_tokens is not None else False
    )
    xlabels = [format_token(t) for t in key_tokens] if key_tokens is not None else False
    ncols = max(1, min(ncols, n_heads))
    nrows = math.ceil(n_heads / ncols)
    if cell_size is None:
        cell_size = min(0.42, 4.2 / max(t_q, t_k, 1))
    side = max(2.6, cell_size * max(t_q, t_k) + 1.0)
    side = min(side, (max_width - 0.9) / ncols)  # panel side in inches, capped
    side = min(side, (max_height - (0.9 if suptitle else 0.5)) / nrows)
    # label only every k-th token so labels (about 9 pt apart) stay legible
    fits = max(2, int((side - 0.6) * 72 / 9))
    step = max(1, math.ceil(max(t_q, t_k) / fits))
    if step > 1:
        ylabels = _every(ylabels, step)
        xlabels = _every(xlabels, step)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(side * ncols + 0.9, side * nrows + (0.5 if suptitle else 0.1)),
        squeeze=False,
        layout="constrained",
    )
    vmax = float(arr.max()) if vmax is None else vmax
    mask_upper = np.triu(np.ones((t_q, t_k), dtype=bool), k=1 + max(0, t_k - t_q))
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= n_heads:
            ax.axis("off")
            continue
        mask = None
        if hide_masked and t_q > 1 and np.all(arr[h][mask_upper] == 0):
            mask = mask_upper
        sns.heatmap(
            arr[h],
            ax=ax,
            mask=mask,
            vmin=vmin,
            vmax=vmax,
            cmap=cmap,
            square=True,
            cbar=False,
            annot=annot,
            fmt=".2f",
            annot_kws={"fontsize": 7},
            xticklabels=xlabels,
            yticklabels=ylabels,
            linewidths=0.3 if side / max(t_q, t_k) >= 0.12 else 0,  # >= 0.12 in cells
            linecolor="white",
        )
        ax.set_facecolor("#f2f2f2")
        ax.grid(False)
        ax.set_title(
            titles[h] if titles is not None else (f"head {h}" if n_heads > 1 else "")
        )
        ax.tick_params(axis="x", labelrotation=90, labelsize=8)
        ax.tick_params(axis="y", labelrotation=0, labelsize=8)
        if n_heads == 1:
            ax.set_ylabel("query (attending token)")
            ax.set_xlabel("key (attended-to token)")
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(vmin, vmax), cmap=cmap)
    fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, label=cbar_label, pad=0.02)
    if n_heads > 1:  # one label per figure: panels may be too narrow for their own
        fig.supylabel("query (attending token)", fontsize=11)
        fig.supxlabel("key (attended-to token)", fontsize=11)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _every(labels, step: int):
    if labels is False:
        return False
    return [lab if i % step == 0 else "" for i, lab in enumerate(labels)]
