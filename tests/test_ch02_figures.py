"""Chapter 2's diagrams draw the tensors they are given: shapes, masks and numbers."""

import importlib.util
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

# each chapter has its own diagrams.py: load this one under a name of its own
_PATH = (
    Path(__file__).resolve().parent.parent / "chapters" / "02_attention" / "diagrams.py"
)
_SPEC = importlib.util.spec_from_file_location("ch02_diagrams", _PATH)
diagrams = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(diagrams)

from tools.book.fonts import MIN_PT, figure_text, print_scale  # noqa: E402

TOKENS = ["the", "cat", "sat", "on", "the", "mat"]


def cells(fig) -> list[Rectangle]:
    """The unit cells of the grids (frames and other patches excluded)."""
    return [
        p
        for p in fig.axes[0].patches
        if isinstance(p, Rectangle) and p.get_width() == 1 and p.get_height() == 1
    ]


def test_qkv_flow_draws_one_cell_per_entry():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    q, k, v = (x @ torch.randn(4, 3, generator=g) for _ in range(3))
    s = q @ k.T / 3**0.5
    w = torch.softmax(s.masked_fill(torch.ones(6, 6).triu(1).bool(), -torch.inf), -1)
    fig = diagrams.qkv_flow(x, q, k, v, s, w, w @ v, TOKENS)
    # x, Q, K, V, three (T, T) stages and the output
    assert len(cells(fig)) == 6 * 4 + 3 * 6 * 3 + 3 * 6 * 6 + 6 * 3
    plt.close(fig)


def test_causal_mask_grid_blocks_the_future():
    blocked = torch.ones(6, 6).triu(1).bool()
    fig = diagrams.causal_mask_grid(TOKENS, blocked)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count(r"$-\infty$") == 15 and texts.count("self") == 6
    assert "21 of 36" in fig.axes[0].get_title()
    plt.close(fig)


def test_head_split_writes_the_tensor_values():
    x = torch.arange(18.0).view(3, 6)
    split = x.view(3, 2, 3)
    heads = split.transpose(0, 1)
    merged = heads.transpose(0, 1).reshape(3, 6)
    torch.testing.assert_close(merged, x)  # no attention: the round trip is exact
    fig = diagrams.head_split(x, split, heads, heads, merged)
    numbers = [t.get_text() for t in fig.axes[0].texts if t.get_text().isdigit()]
    assert len(numbers) == 5 * 18  # five panels of the 18 values
    assert sorted(set(numbers), key=int) == [str(i) for i in range(18)]
    plt.close(fig)


def smallest_printed_pt(fig) -> float:
    """The smallest text of ``fig`` as the book prints it (saved as Jupyter does)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf", bbox_inches="tight")
    text = figure_text(buf.getvalue())
    return min(r.size for r in text.runs) * print_scale(text.width, text.height)


def test_diagrams_print_their_text_at_7_pt_or_more():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    q, k, v = (x @ torch.randn(4, 3, generator=g) for _ in range(3))
    s = q @ k.T / 3**0.5
    blocked = torch.ones(6, 6).triu(1).bool()
    w = torch.softmax(s.masked_fill(blocked, -torch.inf), -1)
    xs = torch.arange(18.0).view(3, 6)
    heads = xs.view(3, 2, 3).transpose(0, 1)
    figs = [
        diagrams.qkv_flow(x, q, k, v, s, w, w @ v, TOKENS),
        diagrams.causal_mask_grid(TOKENS, blocked),
        diagrams.head_split(xs, xs.view(3, 2, 3), heads, heads, xs),
    ]
    for fig in figs:
        assert smallest_printed_pt(fig) >= MIN_PT - 0.005
        plt.close(fig)
