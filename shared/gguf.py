"""Write a course GPT as GGUF, the file llama.cpp runs, from scratch; run it there.

GGUF (llama.cpp's ``ggml/src/gguf.cpp`` reads it; all numbers little-endian)::

    "GGUF"  version (u32 = 3)  tensor count (u64)  metadata count (u64)
    metadata      key (string)  value type (u32)  value
    tensor infos  name (string)  n_dims (u32)  dims (u64 each, fastest first)
                  ggml type (u32)  offset into the data (u64, a multiple of 32)
    zero padding to a multiple of 32, then the tensors' bytes, each padded to 32

A string is its byte length (u64) and its UTF-8 bytes; an array is the element
type (u32), the count (u64) and the elements. Dimensions run fastest first, the
reverse of PyTorch's shape: an ``nn.Linear`` weight (out, in) is (in, out) in GGUF,
which is the layout llama.cpp's matmul wants, so nothing is transposed (Hugging
Face's GPT-2 stores ``Conv1D`` weights the other way round; its converter
transposes them back).

The course model is GPT-2's architecture, llama.cpp's ``gpt2``: learned positions,
LayerNorm with biases, GELU (tanh approximation), fused q|k|v projection, a tied
head (no ``output.weight``: llama.cpp reuses ``token_embd.weight``). The metadata
keys are the ``gpt2.*`` hyperparameters and a ``gpt2`` (byte-level BPE) tokenizer:
every token in GPT-2's printable byte alphabet, the merges by rank, the special
tokens marked CONTROL, and ``tokenizer.ggml.pre = "gpt-2"``, the split pattern the
course tokenizer uses. Grouped-query attention (``n_kv_head``) is written as
``gpt2.attention.head_count_kv``; llama.cpp maps query head h to key/value head
``h // (n_head / n_kv_head)``, as ``shared.attention.repeat_kv`` does.

Weights: ``f32`` (exact), ``f16``, or ``q4_0``: llama.cpp's 4-bit blocks of 32 (one
fp16 scale, 16 bytes of nibbles), filled from ``shared.quantize.quantize_groupwise``
with groups of 32, whose codes and fp16 scales Q4_0 holds exactly. As in
``quantize_model``, the head is quantized (a tied one gets its own copy) and the
token and position embeddings stay f32.

``llamacpp_greedy`` and ``llamacpp_logits`` run a file in llama.cpp through its Python
binding (``pip install -r requirements-llamacpp.txt``, an optional C++ build).
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from shared.chat import CHAT_TEMPLATE, END, has_chat_tokens
from shared.hf_export import check_tokenizer, hf_merges
from shared.model import GPT
from shared.quantize import INT4_MIN, quantize_groupwise
from shared.tokenizer import ENDOFTEXT, BPETokenizer, readable

MAGIC, VERSION, ALIGNMENT = b"GGUF", 3, 32
# metadata value types (gguf.h: enum gguf_type)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
# tensor types (ggml.h: enum ggml_type) and the file types that announce them
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2}  # llama.h: LLAMA_FTYPE_ALL_F32 ...
Q4_0_BLOCK = 32
# token types (llama.h: enum llama_token_type)
NORMAL, CONTROL, UNUSED = 1, 3, 5

LAYER_NAMES = {  # the course's name inside block i -> llama.cpp's
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
TOP_NAMES = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
}

# --------------------------------------------------------------------- encoding


def _string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(kind: int, value) -> bytes:
    """One metadata value of the given GGUF type (arrays: ``(element_type, list)``)."""
    if kind == STRING:
        return _string(value)
    if kind == ARRAY:
        element_kind, items = value
        body = b"".join(_value(element_kind, v) for v in items)
        return struct.pack("<IQ", element_kind, len(items)) + body
    fmt = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f"}
    fmt |= {BOOL: "?", U64: "Q", I64: "q", F64: "d"}
    return struct.pack("<" + fmt[kind], value)


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def write_gguf(
    path: str | Path,
    metadata: dict[str, tuple[int, object]],
    tensors: dict[str, tuple[int, tuple[int, ...], bytes]],
) -> Path:
    """Write a GGUF file: ``metadata`` key -> (type, value); ``tensors`` name ->
    (ggml type, PyTorch-order shape, raw bytes). Returns the path."""
    path = Path(path)
    header = MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(metadata))
    kv = b"".join(
        _string(k) + struct.pack("<I", t) + _value(t, v)
        for k, (t, v) in metadata.items()
    )
    infos, offset = [], 0
    for name, (ggml_type, shape, data) in tensors.items():
        dims = shape[::-1]  # fastest-varying first
        infos.append(
            _string(name)
            + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
        )
        offset += len(data) + _pad(len(data))
    head = header + kv + b"".join(infos)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a crash leaves no half file
    with open(partial, "wb") as f:
        f.write(head + bytes(_pad(len(head))))
        for _, _, data in tensors.values():
            f.write(data + bytes(_pad(len(data))))
    return partial.replace(path)


# ------------------------------------------------------------------ the weights


def q4_0_bytes(w: torch.Tensor) -> bytes:
    """An (out, in) weight as llama.cpp's Q4_0: per 32 inputs, an fp16 scale and 16
    bytes; byte j holds code j (low nibble) and code j + 16 (high), each + 8."""
    q, scale = quantize_groupwise(w, Q4_0_BLOCK)
    u = (q.to(torch.int16) - INT4_MIN).to(torch.uint8).view(*scale.shape, 2, 16)
    nibbles = (u[..., 0, :] | (u[..., 1, :] << 4)).numpy()  # (out, blocks, 16)
    d = scale.numpy().astype("<f2").view(np.uint8).reshape(*scale.shape, 2)
    return np.concatenate([d, nibbles], axis=-1).tobytes()


def _tensor(t: torch.Tensor, dtype: str) -> tuple[int, tuple[int, ...], bytes]:
    t = t.detach().float().cpu().contiguous()
    if t.dim() == 1 or dtype == "f32":  # norms and biases stay f32, as llama.cpp's
        return GGML_TYPES["f32"], tuple(t.shape), t.numpy().astype("<f4").tobytes()
    if dtype == "f16":
        return GGML_TYPES["f16"], tuple(t.shape), t.numpy().astype("<f2").tobytes()
    return GGML_TYPES["q4_0"], tuple(t.shape), q4_0_bytes(t)


def gguf_tensors(model: GPT, dtype: str = "f32") -> Iterator[tuple[str, tuple]]:
    """``(llama.cpp name, (type, shape, bytes))`` for each weight; a tied head once."""
    for key, value in model.state_dict().items():
        module, _, kind = key.rpartition(".")  # kind: weight or bias
        if module == "lm_head" and model.config.tie_weights and dtype != "q4_0":
            continue  # llama.cpp falls back to token_embd.weight
        if module.startswith("transformer.h."):
            i, _, rest = module.removeprefix("transformer.h.").partition(".")
            name = f"blk.{i}.{LAYER_NAMES[rest]}.{kind}"
        else:
            name = f"{TOP_NAMES[module]}.{kind}"
        # the lookup tables stay f32: rows are read, not multiplied (quantize_model)
        table = module in ("transformer.wte", "transformer.wpe") and dtype == "q4_0"
        yield name, _tensor(value, "f32" if table else dtype)


# ------------------------------------------------------------------- the metadata


def check_gguf_exportable(model: GPT) -> None:
    """Raise ValueError unless llama.cpp's ``gpt2`` architecture holds this model."""
    cfg = model.config
    wanted = dict(pos_encoding="learned", norm="layernorm", ffn="gelu", bias=True)
    wrong = [
        f"{k}={getattr(cfg, k)!r}" for k, v in wanted.items() if getattr(cfg, k) != v
    ]
    if wrong:
        raise ValueError(
            "llama.cpp's gpt2 architecture needs learned positions, LayerNorm, GELU "
            f"and biases; this model has {', '.join(wrong)}"
        )


def tokenizer_metadata(tokenizer: BPETokenizer, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` keys: tokens by id, their types, merges, specials."""
    check_tokenizer(tokenizer, vocab_size)
    names = {i: readable(b) for i, b in tokenizer.vocab.items()}
    names |= {i: s for s, i in tokenizer.special_tokens.items()}
    special = set(tokenizer.special_tokens.values())
    tokens = [names.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        CONTROL if i in special else NORMAL if i in names else UNUSED
        for i in range(vocab_size)
    ]
    merges = [f"{a} {b}" for a, b in hf_merges(tokenizer)]
    meta = {
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.pre": (STRING, "gpt-2"),  # GPT-2's split pattern
        "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
        "tokenizer.ggml.token_type": (ARRAY, (I32, types)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, merges)),
        "tokenizer.ggml.add_bos_token": (BOOL, False),  # the course adds none
    }
    specials = tokenizer.special_tokens
    eot = specials.get(ENDOFTEXT)
    eos = specials.get(END, eot)  # a chat model's turn ends at <|end|>
    if eot is not None:
        meta["tokenizer.ggml.bos_token_id"] = (U32, eot)
    if eos is not None:
        meta["tokenizer.ggml.eos_token_id"] = (U32, eos)
    if has_chat_tokens(tokenizer):
        meta["tokenizer.ggml.eot_token_id"] = (U32, specials[END])
        meta["tokenizer.chat_template"] = (STRING, CHAT_TEMPLATE)
    return meta


def gguf_metadata(
    model: GPT, tokenizer: BPETokenizer, name: str = "course-gpt", dtype: str = "f32"
) -> dict:
    """Every metadata key llama.cpp reads for a ``gpt2`` model, and the tokenizer's."""
    cfg = model.config
    meta = {
        "general.architecture": (STRING, "gpt2"),
        "general.name": (STRING, name),
        "general.file_type": (U32, FILE_TYPES[dtype]),
        "gpt2.context_length": (U32, cfg.context_length),
        "gpt2.embedding_length": (U32, cfg.n_embd),
        "gpt2.feed_forward_length": (U32, cfg.hidden_size),
        "gpt2.block_count": (U32, cfg.n_layer),
        "gpt2.attention.head_count": (U32, cfg.n_head),
        "gpt2.attention.head_count_kv": (U32, cfg.n_kv_head or cfg.n_head),
        "gpt2.attention.layer_norm_epsilon": (F32, model.transformer.ln_f.eps),
    }
    return meta | tokenizer_metadata(tokenizer, cfg.vocab_size)


def export_gguf(
    model: GPT,
    tokenizer: BPETokenizer,
    path: str | Path,
    name: str = "course-gpt",
    dtype: str = "f32",
) -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file (dtype: f32, f16, q4_0)."""
    if dtype not in GGML_TYPES:
        raise ValueError(f"dtype must be one of {list(GGML_TYPES)}, got {dtype!r}")
    check_gguf_exportable(model)
    metadata = gguf_metadata(model, tokenizer, name, dtype)
    return write_gguf(path, metadata, dict(gguf_tensors(model, dtype)))


# ------------------------------------------------------------ running llama.cpp


def load_llamacpp(
    path: str | Path, n_ctx: int, logits_all: bool = False, threads: int = 1
):
    """A ``llama_cpp.Llama`` for a file, its key/value cache in f32 (the default, f16,
    rounds every cached key and value), on one thread unless told otherwise."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(
            "llama.cpp's binding is optional: pip install -r requirements-llamacpp.txt"
        ) from e

    # llama.cpp rounds n_ctx up to 256 and then warns that it exceeds the model's
    # 128 positions (harmless: we never feed more). The binding's log filter takes
    # llama.cpp's warnings for errors, so while loading only errors are shown.
    def errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR (3 is a warning)
            sys.stderr.write(text.decode("utf-8", "replace"))

    quiet = llama_cpp.llama_log_callback(errors_only)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    try:
        f32 = llama_cpp.GGML_TYPE_F32
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
            n_threads_batch=threads, logits_all=logits_all, type_k=f32, type_v=f32,
            verbose=False,
        )  # fmt: skip
    finally:  # the binding's own callback again
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, None)
    context = int(llm.metadata.get("gpt2.context_length", n_ctx))
    if n_ctx > context:
        llm.close()
        raise ValueError(f"{n_ctx} positions asked for, the model has {context}")
    return llm


def llamacpp_greedy(
    gguf_path: str | Path, ids: list[int], n: int, llm=None
) -> list[int]:
    """``n`` greedy tokens after the prompt ``ids``, decoded by llama.cpp (its own
    greedy sampler and KV cache). Pass ``llm`` to reuse a loaded model. No stop
    token: like ``generate`` without ``eos_id``. The prompt and the new tokens must
    fit the model's context (llama.cpp has no sliding window for learned positions).
    """
    llm = llm or load_llamacpp(gguf_path, n_ctx=len(ids) + n)
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def llamacpp_logits(gguf_path: str | Path, ids: list[int], llm=None) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for one forward pass over ``ids``."""
    llm = llm or load_llamacpp(gguf_path, n_ctx=len(ids), logits_all=True)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])
