"""The architecture diagram of chapter 3, drawn from a model's config.

``gpt_architecture(config)`` draws the GPT of ``shared.model`` with the config's
sizes written in: token and position embeddings added into the residual stream,
``n_layer`` pre-norm blocks (one of them opened up: LayerNorm, attention, residual
add; LayerNorm, MLP, residual add), the final LayerNorm and the output head that
shares its matrix with the token embedding.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, ConnectionPatch, FancyArrowPatch, FancyBboxPatch

from shared.model import GPTConfig

# fills that differ in lightness, so the kinds of box stay apart in greyscale
FILL = {
    "embed": "#e3e3e3",
    "norm": "#ffffff",
    "attn": "#9ecae1",
    "mlp": "#fdd0a2",
    "block": "#f0f0f0",
    "head": "#e3e3e3",
}
TEXT_PT = 9  # box labels; the figure prints at full size (narrower than the page)
NOTE_PT = 8  # shapes and side notes


def _box(ax, x0, y0, w, h, text, kind, fontsize=TEXT_PT, lw=1.0):
    ax.add_patch(
        FancyBboxPatch(
            (x0, y0),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=0.6",
            fc=FILL[kind],
            ec="black",
            lw=lw,
        )
    )
    ax.text(x0 + w / 2, y0 + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, lw=1.2, style="-|>"):
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle=style, mutation_scale=10, lw=lw, color="black"
        )
    )


def _add(ax, x, y, r=1.1):
    """A residual addition: a circled plus on the stream."""
    ax.add_patch(Circle((x, y), r, fc="white", ec="black", lw=1.2, zorder=3))
    ax.text(x, y - 0.1, "+", ha="center", va="center", fontsize=11, zorder=4)


def gpt_architecture(config: GPTConfig) -> plt.Figure:
    """The pre-norm GPT of ``config``: the model on the left, one block on the right."""
    V, T, d = config.vocab_size, config.context_length, config.n_embd
    n, hidden = config.n_layer, config.hidden_size
    norm = "RMSNorm" if config.norm == "rmsnorm" else "LayerNorm"
    positions = {  # what is added to the token vectors (RoPE adds nothing)
        "learned": f"position emb.\nwpe ({T}, {d})",
        "sinusoidal": f"sinusoidal table\n({T}, {d}), fixed",
        "rope": None,
    }[config.pos_encoding]
    fig, ax = plt.subplots(figsize=(6.1, 5.6))
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(-2.5, 63.5)
    ax.set_ylim(-1, 57.5)
    ax.set_aspect("equal")
    ax.axis("off")

    # ---------------------------------------------------------------- the model
    cx = 15.0  # the residual stream of the model
    ax.text(cx, 0.4, "token ids (B, T)", ha="center", va="bottom", fontsize=TEXT_PT)
    _box(ax, 1.5, 4.0, 12.8, 5.0, f"token embedding\nwte ({V}, {d})", "embed")
    _arrow(ax, (cx - 2, 2.3), (7.9, 4.0))
    y_add = 12.0
    if positions is None:  # the token vectors enter the stream as they are
        _arrow(ax, (7.9, 9.0), (cx, y_add))
    else:
        _box(ax, 15.7, 4.0, 12.8, 5.0, positions, "embed")
        _arrow(ax, (cx + 2, 2.3), (22.1, 4.0))
        _add(ax, cx, y_add)
        _arrow(ax, (7.9, 9.0), (cx - 1.0, y_add - 0.4))
        _arrow(ax, (22.1, 9.0), (cx + 1.0, y_add - 0.4))
    # the blocks, on the stream
    block_h, gap = 3.6, 1.6
    shown = list(range(1, n + 1)) if n <= 4 else [1, 2, None, n]
    y = y_add + 2.4
    block_boxes = []
    for k in shown:
        _arrow(ax, (cx, y - gap + (0.3 if k != shown[0] else 0.3)), (cx, y))
        if k is None:  # more blocks than drawn
            ax.text(cx, y + block_h / 2, "⋮", ha="center", va="center", fontsize=12)
        else:
            _box(ax, 5.0, y, 20.0, block_h, f"block {k}", "block")
            block_boxes.append((5.0, y, 20.0, block_h))
        y += block_h + gap
    ax.text(
        25.6,
        y_add + 2.4 + (y - y_add - 2.4 - gap) / 2,
        f"× {n}",
        ha="left",
        va="center",
        fontsize=TEXT_PT + 1,
    )
    _arrow(ax, (cx, y - gap + 0.3), (cx, y))
    _box(ax, 5.0, y, 20.0, 3.6, f"final {norm} ln_f", "norm")
    y_head = y + 3.6 + gap
    _arrow(ax, (cx, y + 3.6), (cx, y_head))
    _box(ax, 5.0, y_head, 20.0, 5.0, f"output head lm_head\n({d} → {V})", "head")
    _arrow(ax, (cx, y_head + 5.0), (cx, y_head + 6.6))
    ax.text(
        cx,
        y_head + 6.8,
        f"logits (B, T, {V})",
        ha="center",
        va="bottom",
        fontsize=TEXT_PT,
    )
    # the output head is the token embedding's matrix: a dashed line joins them
    y_tie = y_head + 2.5
    if config.tie_weights:
        ax.plot([5.0, 0.0, 0.0], [y_tie, y_tie, 6.5], color="black", lw=1.0, ls="--")
        _arrow(ax, (0.0, 6.5), (1.5, 6.5), lw=1.0)
        _arrow(ax, (0.0, y_tie), (5.0, y_tie), lw=1.0)
        ax.text(
            -0.4,
            (y_tie + 6.5) / 2,
            "tied: one matrix",
            rotation=90,
            ha="right",
            va="center",
            fontsize=NOTE_PT,
        )

    ax.text(
        cx - 1.6,
        y_add,
        "residual\nstream",
        ha="right",
        va="center",
        fontsize=NOTE_PT,
        color="#333",
    )

    # ---------------------------------------------------------------- one block
    sx = 37.0  # the stream through the block
    bx, bw = 42.0, 20.0  # the sub-layers' boxes
    by0, by1 = 3.5, 53.0
    ax.add_patch(
        FancyBboxPatch(
            (33.0, by0),
            30.0,
            by1 - by0,
            boxstyle="round,pad=0,rounding_size=1.0",
            fc=FILL["block"],
            ec="black",
            lw=1.0,
        )
    )
    ax.text(
        48.0,
        by1 - 0.8,
        "one block (pre-norm)",
        ha="center",
        va="top",
        fontsize=TEXT_PT + 1,
        fontweight="bold",
    )
    # zoom lines from the first drawn block to the open one
    x0, y0, w, h = block_boxes[0]
    for (xa, ya), (xb, yb) in [
        ((x0 + w, y0), (33.0, by0)),
        ((x0 + w, y0 + h), (33.0, by1)),
    ]:
        fig.add_artist(
            ConnectionPatch(
                (xa, ya),
                (xb, yb),
                "data",
                "data",
                axesA=ax,
                axesB=ax,
                color="grey",
                lw=0.8,
                ls=":",
            )
        )
    ax.text(sx, 0.4, "x (B, T, d)", ha="center", va="bottom", fontsize=NOTE_PT)
    _arrow(ax, (sx, 2.3), (sx, by0 + 2.0), style="-")
    rope = " + RoPE" if config.pos_encoding == "rope" else ""
    mlp = (
        f"SwiGLU: SiLU gate ⊙ up,\n{d}→{hidden}→{d}"
        if config.ffn == "swiglu"
        else f"MLP: Linear {d}→{hidden},\nGELU, Linear {hidden}→{d}"
    )
    sublayers = [
        (f"{norm} ln_1", "norm", 3.2),
        (f"causal self-attention\n{config.n_head} heads{rope}", "attn", 5.0),
        (f"{norm} ln_2", "norm", 3.2),
        (mlp, "mlp", 5.0),
    ]
    y = by0 + 3.0
    for i in range(2):  # two sub-layers, each: branch, norm, op, add back
        (t_norm, k_norm, h_norm), (t_op, k_op, h_op) = sublayers[2 * i : 2 * i + 2]
        y_branch = y
        bc = bx + bw / 2
        ax.plot([sx, bc], [y_branch, y_branch], color="black", lw=1.2)
        _arrow(ax, (bc, y_branch), (bc, y_branch + 1.5))
        _box(ax, bx, y_branch + 1.5, bw, h_norm, t_norm, k_norm)
        y_op = y_branch + 1.5 + h_norm + 1.5
        _arrow(ax, (bc, y_op - 1.5), (bc, y_op))
        _box(ax, bx, y_op, bw, h_op, t_op, k_op)
        y_add_b = y_op + h_op + 1.8
        ax.plot([bc, bc], [y_op + h_op, y_add_b], color="black", lw=1.2)
        _arrow(ax, (bc, y_add_b), (sx + 1.1, y_add_b))
        _add(ax, sx, y_add_b)
        _arrow(ax, (sx, y_branch), (sx, y_add_b - 1.1))  # the stream, untouched
        y = y_add_b + 3.0
        if i == 0:
            _arrow(ax, (sx, y_add_b + 1.1), (sx, y), style="-")
    _arrow(ax, (sx, y - 3.0 + 1.1), (sx, by1 + 1.6))
    ax.text(sx, by1 + 1.8, "x (B, T, d)", ha="center", va="bottom", fontsize=NOTE_PT)
    ax.text(
        sx - 0.8,
        by0 + 14.0,
        "residual stream",
        rotation=90,
        ha="right",
        va="center",
        fontsize=NOTE_PT,
        color="#333",
    )
    return fig
