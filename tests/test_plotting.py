import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from shared.plotting import attention_heatmap, format_token, use_book_style  # noqa: E402


def causal_weights(heads: int, t: int) -> torch.Tensor:
    scores = torch.randn(heads, t, t, generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def test_heads_side_by_side_with_labels_and_one_colorbar():
    use_book_style(vector=False)
    tokens = ["The", " cat", " sat", " on", " the", " mat"]
    fig = attention_heatmap(causal_weights(3, 6), tokens, suptitle="three heads")
    head_axes = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in head_axes] == ["head 0", "head 1", "head 2"]
    ylabels = [t.get_text() for t in head_axes[0].get_yticklabels()]
    xlabels = [t.get_text() for t in head_axes[0].get_xticklabels()]
    assert ylabels == ["The", "␣cat", "␣sat", "␣on", "␣the", "␣mat"]
    assert xlabels == ylabels
    assert fig.get_supylabel().startswith("query")
    assert fig.get_supxlabel().startswith("key")
    assert len(fig.axes) == 4  # 3 heads + exactly one colour bar
    plt.close(fig)


def test_single_matrix_numpy_input_and_grid_layout():
    fig = attention_heatmap(np.full((4, 4), 0.25), list("abcd"), ncols=2, titles=["w"])
    assert len(fig.axes) == 2
    assert fig.axes[0].get_ylabel().startswith("query")
    assert fig.axes[0].get_xlabel().startswith("key")
    plt.close(fig)
    fig = attention_heatmap(causal_weights(5, 4), ncols=2)
    visible = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert len(visible) == 5  # a 3x2 grid with one empty slot switched off
    plt.close(fig)


def test_long_sequences_thin_out_labels():
    tokens = [f"t{i}" for i in range(100)]
    fig = attention_heatmap(causal_weights(1, 100), tokens)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert 0 < sum(bool(s) for s in labels) <= 34
    plt.close(fig)


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="heads, T_q, T_k"):
        attention_heatmap(np.zeros(5))
    with pytest.raises(ValueError, match="query tokens"):
        attention_heatmap(np.zeros((3, 3)), ["a", "b"])


def test_format_token_shows_whitespace():
    assert format_token(" the\n") == "␣the\\n"
    assert format_token("\t\r") == "\\t\\r"


@pytest.mark.parametrize(
    "heads,t,ncols", [(1, 6, 4), (4, 10, 2), (8, 64, 4), (12, 128, 6), (12, 24, 2)]
)
def test_figures_print_at_full_size(heads, t, ncols):
    """The saved figure fits the book's text block (6.3 x 6.8 in): never shrunk."""
    fig = attention_heatmap(
        causal_weights(heads, t),
        [f"w{i}" for i in range(t)],
        ncols=ncols,
        suptitle="a title",
    )
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # what bbox="tight" saves
    assert box.width <= 6.3 and box.height <= 6.8, (box.width, box.height)
    plt.close(fig)
