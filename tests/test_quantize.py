"""Weight-only int8 quantization: the rounding bound, Int8Linear, the shipped model
quantized (sizes, loss, agreement with fp32), torchao as a reference, save/load."""

import copy
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared.loss import bits_per_char, evaluate_split
from shared.model import GPT
from shared.pretrained import load_course_model, shakespeare_splits
from shared.quantize import (
    Int8Linear,
    dequantize,
    linear_weight_bytes,
    model_bytes,
    quantize_int8,
    quantize_per_channel,
    to_bf16,
)

N_WINDOWS = 32  # validation prefix: 32 windows of 128 tokens, ~1 s per model
MIN_AGREEMENT = 0.98  # measured 0.990 on this prefix (and on the whole split)
# int8 weights move bits/char by a few parts in 10^4: measured on this prefix, fp32
# 1.95384, ours 1.95333 (-2.6e-4 relative), torchao's 1.95384 (-7e-7)
INT8_BPC_REL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small matmuls: a second thread only adds contention on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the maths


def test_rounding_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    # rows of very different magnitudes: one scale per row must follow each
    w = torch.randn(64, 48) * torch.logspace(-4, 2, 64)[:, None]
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (64,)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize(q, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    nonzero = torch.arange(64) != 5
    # the largest entry of each row maps to +-127: the whole range is used
    assert (q[nonzero].abs().amax(dim=1) == 127).all()
    assert (dequantize(q, scale)[5] == 0).all() and (q[5] == 0).all()


def test_rows_on_the_grid_come_back_exactly():
    # integers times a power of two, each row reaching 127: scale = step exactly
    k = torch.randint(-127, 128, (8, 32))
    k[:, 0] = 127
    k[::2, 1] = -127
    w = k.float() * 2.0 ** torch.arange(-8, 0).float()[:, None]
    q, scale = quantize_per_channel(w)
    assert torch.equal(q.long(), k)
    assert torch.equal(dequantize(q, scale), w)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_within_the_rounding_bound(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    qlin = Int8Linear.from_linear(lin)
    assert qlin.weight.dtype == torch.int8 and (qlin.bias is None) == (not bias)
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        y, y_ref = qlin(x), lin(x)
    # |x . (w - w_q)| <= sum_i |x_i| * scale / 2 for each output, plus float rounding
    bound = x.abs().sum(-1, keepdim=True) * qlin.scale / 2 + 1e-5
    assert y.shape == y_ref.shape
    assert ((y - y_ref).abs() <= bound).all()
    # and it is a real approximation, not just inside a loose bound
    assert (y - y_ref).norm() / y_ref.norm() < 0.01
    assert "int8" in repr(qlin)


def test_int8_linear_follows_the_input_dtype():
    qlin = Int8Linear.from_linear(nn.Linear(16, 8))
    y = qlin(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_model_bytes_counts_a_tied_tensor_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert model_bytes(model) == 10 * 4 * 4
    assert linear_weight_bytes(quantize_int8(model)) == 10 * 4 + 10 * 4  # q + scales


# ------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    model, tokenizer, _ = load_course_model("cpu")
    splits = shakespeare_splits(tokenizer)
    ids = np.asarray(splits["val_ids"], dtype=np.int64)[: N_WINDOWS * 128 + 1]
    # characters in proportion to the prefix, for bits/char
    chars = splits["val_chars"] * len(ids) / len(splits["val_ids"])
    return model, ids, chars


@pytest.fixture(scope="module")
def fp32_result(shipped):
    model, ids, chars = shipped
    result = _result(model, ids, chars)
    # the one-pass loss is the course evaluator's
    loss = evaluate_split(model, ids)
    assert result["bpc"] == pytest.approx(bits_per_char(loss, len(ids), chars))
    return result


def _result(model, ids, chars) -> dict:
    """Bits/char and argmax next tokens in one pass (evaluate_split's windows)."""
    x = torch.as_tensor(ids[:-1]).view(N_WINDOWS, -1)
    y = torch.as_tensor(ids[1:]).view(N_WINDOWS, -1)
    with torch.no_grad():
        logits, loss = model(x, y)
    bpc = bits_per_char(loss.item(), len(ids), chars)
    return {"bpc": bpc, "argmax": logits.argmax(-1)}


def test_quantized_shipped_model_is_smaller_and_as_good(shipped, fp32_result):
    model, ids, chars = shipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize_int8(model)

    assert not any(isinstance(m, nn.Linear) for m in qmodel.modules())
    n_int8 = sum(isinstance(m, Int8Linear) for m in qmodel.modules())
    assert n_int8 == 4 * model.config.n_layer + 1  # 4 per block, and lm_head
    # the tie is gone: the embedding stays fp32, the head has its own int8 copy
    assert qmodel.transformer.wte.weight.dtype == torch.float32
    assert qmodel.lm_head.weight.dtype == torch.int8

    ratio = linear_weight_bytes(model) / linear_weight_bytes(qmodel)
    assert ratio >= 3.5, f"linear weights only {ratio:.2f}x smaller"
    assert model_bytes(qmodel) < 0.4 * model_bytes(model)

    result = _result(qmodel, ids, chars)
    assert result["bpc"] == pytest.approx(fp32_result["bpc"], rel=INT8_BPC_REL)
    agreement = (result["argmax"] == fp32_result["argmax"]).float().mean().item()
    assert agreement > MIN_AGREEMENT, f"argmax agrees with fp32 on {agreement:.3f}"

    # the fp32 model is untouched, tie included
    assert model.lm_head.weight is model.transformer.wte.weight
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_skipping_the_head_keeps_it_tied(shipped):
    model, _, _ = shipped
    qmodel = quantize_int8(model, skip=("lm_head",))
    assert type(qmodel.lm_head) is nn.Linear
    assert qmodel.lm_head.weight is qmodel.transformer.wte.weight
    assert isinstance(qmodel.transformer.h[0].mlp.c_fc, Int8Linear)


def test_bf16_copy_is_half_the_size(shipped):
    model, _, _ = shipped
    assert model_bytes(to_bf16(model)) == model_bytes(model) // 2
    assert next(model.parameters()).dtype == torch.float32


def test_torchao_int8_weight_only_matches_fp32_loss_too(shipped, fp32_result):
    # torchao's import logs the CUDA extensions a CPU torch can't load, and torch an
    # Enum that torchao registers with torch.compile
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from torchao import quantization  # pinned: a broken install fails, never skips

    model, ids, chars = shipped
    ao_model = copy.deepcopy(model)
    quantization.quantize_(ao_model, quantization.Int8WeightOnlyConfig())
    result = _result(ao_model, ids, chars)
    assert result["bpc"] == pytest.approx(fp32_result["bpc"], rel=INT8_BPC_REL)
    agreement = (result["argmax"] == fp32_result["argmax"]).float().mean().item()
    assert agreement > MIN_AGREEMENT
    # torchao quantizes the tied head as well, leaving the embedding fp32: as ours
    assert ao_model.transformer.wte.weight.dtype == torch.float32
    assert ao_model.lm_head.weight is not ao_model.transformer.wte.weight
    ratio = linear_weight_bytes(model) / linear_weight_bytes(ao_model)
    assert ratio >= 3.5


def test_state_dict_round_trip_gives_identical_outputs(shipped, tmp_path):
    model, ids, _ = shipped
    qmodel = quantize_int8(model)
    save_file(qmodel.state_dict(), tmp_path / "int8.safetensors")
    # a skeleton of the same structure (its random weights are overwritten)
    fresh = quantize_int8(GPT(model.config)).eval()
    fresh.load_state_dict(load_file(tmp_path / "int8.safetensors"))
    assert fresh.lm_head.weight.dtype == torch.int8
    x = torch.as_tensor(ids[:256]).view(2, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))
