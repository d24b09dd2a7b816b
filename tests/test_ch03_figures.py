"""Chapter 3's architecture diagram draws the model its config describes."""

import importlib.util
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from shared.model import GPTConfig  # noqa: E402
from tools.book.fonts import MIN_PT, figure_text, print_scale  # noqa: E402

# each chapter has its own diagrams.py: load this one under a name of its own
_PATH = (
    Path(__file__).resolve().parent.parent / "chapters" / "03_gpt_model" / "diagrams.py"
)
_SPEC = importlib.util.spec_from_file_location("ch03_diagrams", _PATH)
diagrams = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(diagrams)
gpt_architecture = diagrams.gpt_architecture


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def test_the_config_sizes_are_written_in():
    cfg = GPTConfig(vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128)
    fig = gpt_architecture(cfg)
    drawn = texts(fig)
    assert [t for t in drawn if t.startswith("block ")] == [
        f"block {k}" for k in (1, 2, 3, 4)
    ]
    assert "× 4" in drawn and "4 heads" in "\n".join(drawn)
    assert "token embedding\nwte (65, 128)" in drawn
    assert "position emb.\nwpe (64, 128)" in drawn
    assert "MLP: Linear 128→512,\nGELU, Linear 512→128" in drawn
    assert "output head lm_head\n(128 → 65)" in drawn
    assert "tied: one matrix" in drawn
    assert drawn.count("+") == 3  # embeddings added, then the block's two residual adds
    plt.close(fig)


def test_deep_models_elide_blocks_and_variants_change_the_labels():
    cfg = GPTConfig(
        vocab_size=65,
        context_length=64,
        n_layer=12,
        n_head=4,
        n_embd=128,
        pos_encoding="rope",
        norm="rmsnorm",
        ffn="swiglu",
        tie_weights=False,
    )
    fig = gpt_architecture(cfg)
    drawn = texts(fig)
    assert [t for t in drawn if t.startswith("block ")] == [
        "block 1",
        "block 2",
        "block 12",
    ]
    assert "⋮" in drawn and "× 12" in drawn
    assert "final RMSNorm ln_f" in drawn and "RMSNorm ln_1" in drawn
    assert not any("wpe" in t for t in drawn)  # RoPE adds nothing to the embeddings
    assert "causal self-attention\n4 heads + RoPE" in drawn
    assert any(t.startswith("SwiGLU") and f"{cfg.hidden_size}" in t for t in drawn)
    assert "tied: one matrix" not in drawn
    assert drawn.count("+") == 2
    plt.close(fig)


@pytest.mark.parametrize("size", ["124M", "1558M"])
def test_gpt2_sizes(size):
    cfg = GPTConfig.gpt2(size)
    fig = gpt_architecture(cfg)
    drawn = texts(fig)
    assert f"token embedding\nwte (50257, {cfg.n_embd})" in drawn
    assert f"× {cfg.n_layer}" in drawn
    # the book prints it at full size: every label at 7 pt or more on paper
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf", bbox_inches="tight")
    text = figure_text(buf.getvalue())
    scale = print_scale(text.width, text.height)
    assert min(r.size for r in text.runs) * scale >= MIN_PT - 0.005
    plt.close(fig)
