"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling.

``generate`` asks the model for the next-token logits, filters and samples them, and
appends the token, until ``max_new_tokens`` or every sequence has emitted ``eos_id``.
``KVCache`` keeps every layer's keys and values so each step runs only the new token
(``use_cache=True``, the default); ``iter_tokens`` yields tokens as they come.
``complete`` and ``stream`` take and give text (stop sequences, seeds), and
``python -m shared.generate --prompt "ROMEO:" --max-new-tokens 100`` prints it.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import torch
from torch import nn

from shared.model import position_ids_from_mask


class LayerCache:
    """One layer's view of a ``KVCache``: stores new keys/values, returns all so far."""

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.layer, k, v)


class KVCache:
    """Keys and values of every layer, pre-allocated for ``max_len`` positions.

    Generation runs the prompt through the model once (*prefill*), then one token
    at a time (*decode*): each step computes the new token's query, key and value
    only, writes key and value after the cached ones, and attends to all of them.
    The tensors (n_layer, B, n_head, max_len, head_dim) are allocated on the first
    write, with the keys' batch size, dtype and device; writing is a copy into a
    slice, not a concatenation that reallocates everything at every step.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer, self.max_len, self.length = n_layer, max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, n_head, T, head_dim) at the next T positions of
        ``layer``; return that layer's keys and values up to and including them."""
        b, h, t, d = k.shape
        if self.k is None:
            shape = (self.n_layer, b, h, self.max_len, d)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        """Count ``t`` more cached positions (the model calls it after all layers)."""
        self.length += t

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_token(config, batch_size: int = 1, bytes_per_value: int = 4) -> int:
        """Cache bytes one position costs: keys and values, every layer and head."""
        return 2 * config.n_layer * config.n_embd * batch_size * bytes_per_value


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row, set the rest to -inf (ties kept)."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probabilities sum to >= ``p``."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:  # the whole distribution; cumsum rounding must not drop the tail
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when those before it already reach p; the first always stays
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token_distribution(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Probabilities (B, V) that sampling uses: temperature, then top-k, then top-p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:  # greedy: all mass on the argmax
        return torch.zeros_like(logits).scatter(
            -1, logits.argmax(-1, keepdim=True), 1.0
        )
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row (B, 1) from last-position logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_distribution(logits, temperature, top_k, top_p)
    if generator is not None and generator.device != probs.device:
        # a CPU generator keeps samples reproducible across devices
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def _next_token_logits(
    model: nn.Module, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (B, V) for the position after ``idx``, cropped to the model's context.

    With a (B, T) ``attention_mask`` (0 = left padding) padding is not attended to and
    positions count from each row's first real token.
    """
    context = model.config.context_length
    idx = idx[:, -context:]  # forget tokens that fell out of the window
    if attention_mask is None:
        return model(idx)[:, -1, :]
    mask = attention_mask[:, -context:]
    logits = model(idx, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return logits[:, -1, :]


def _cached_logits(
    model: nn.Module,
    idx: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: KVCache,
) -> torch.Tensor:
    """Logits (B, V) after ``idx``, running only the tokens the cache lacks."""
    new = idx[:, cache.length :]  # the whole prompt first (prefill), then one token
    if attention_mask is None:
        return model(new, kv_cache=cache)[:, -1, :]
    positions = position_ids_from_mask(attention_mask)[:, cache.length :]
    logits = model(
        new, attention_mask=attention_mask, position_ids=positions, kv_cache=cache
    )
    return logits[:, -1, :]


@torch.no_grad()
def iter_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each new token (B, 1) as soon as it is sampled (streaming).

    The arguments are ``generate``'s. With ``eos_id`` a finished row keeps yielding
    ``eos_id`` until every row is done, then the iterator stops. The model is in eval
    mode while the iterator runs and back in its previous mode when it ends.
    """
    if idx.dim() == 1:
        raise ValueError("idx must be (batch, time); use idx[None] for one sequence")
    if idx.size(1) == 0:
        raise ValueError(
            "the prompt is empty: give at least one token to continue from, e.g. "
            "the tokenizer's <|endoftext|> id to start a new text"
        )
    was_training = model.training
    model.eval()
    context = model.config.context_length
    # the cache holds the window; past it, positions would run out (learned) or
    # leave the trained range (RoPE), so generation goes on by recomputing the
    # last ``context`` tokens at each step, exactly as without a cache
    cache = None
    if use_cache and max_new_tokens > 0 and idx.size(1) < context:
        # room for the prompt and the new tokens (the last one is never fed back)
        cache = KVCache(
            model.config.n_layer, min(context, idx.size(1) + max_new_tokens)
        )
    try:
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and cache.length < cache.max_len:
                logits = _cached_logits(model, idx, attention_mask, cache)
            else:
                logits = _next_token_logits(model, idx, attention_mask)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(done[:, None], eos_id)
                done |= token[:, 0] == eos_id
            idx = torch.cat([idx, token], dim=1)
            if attention_mask is not None:
                ones = torch.ones_like(token, dtype=attention_mask.dtype)
                attention_mask = torch.cat([attention_mask, ones], dim=1)
            yield token
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + n).

    ``temperature=0`` is greedy decoding. With ``eos_id`` a sequence stops after
    emitting it; in a batch, finished rows are padded with ``eos_id`` until all are
    done. Prompts of different lengths go in one batch left-padded, with
    ``attention_mask`` (B, T) marking real tokens 1 and padding 0. The model runs in
    eval mode (no dropout) and its previous mode is restored afterwards.
    ``use_cache`` keeps keys and values in a ``KVCache`` (same tokens, faster);
    ``False`` recomputes the whole window at every step.
    """
    new = list(
        iter_tokens(
            model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
            generator, attention_mask, use_cache,
        )
    )  # fmt: skip
    return torch.cat([idx, *new], dim=1)


# ------------------------------------------------------------ text in, text out
# ``complete`` returns a prompt's continuation as a string, ``stream`` yields it in
# pieces as the tokens arrive, and ``main`` is the command line.

ENDOFTEXT = "<|endoftext|>"


@dataclass
class Completion:
    """One finished completion: its text, why it ended, and its token counts."""

    text: str
    finish_reason: str  # "stop": <|endoftext|> or a stop sequence; "length": the limit
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, a final <|endoftext|> included


def check_settings(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> tuple[str, ...]:
    """Raise ``ValueError`` for settings sampling cannot use; returns the stops."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # written so that NaN fails too
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if "" in stops:
        raise ValueError("a stop sequence must not be empty")
    return stops


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids (special tokens allowed); "" starts a new text."""
    ids = tokenizer.encode(prompt, allowed_special="all")
    return ids or [tokenizer.special_tokens[ENDOFTEXT]]


def _sampled_ids(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    eos_id: int | None,
) -> Iterator[int]:
    """Each new token id as it is sampled (the prompt is cropped to the window)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # a CPU generator: the same seed gives the same text on every device
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = iter_tokens(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=eos_id, generator=generator,
    )  # fmt: skip
    with closing(tokens):  # stopping early ends iter_tokens now, not when collected
        for token in tokens:
            yield int(token[0, 0])


def _complete_prefix(data: bytes) -> str:
    """``data`` decoded but for an unfinished character at the end (more may come)."""
    return codecs.utf_8_decode(data, "replace", False)[0]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop sequence in ``text`` starts, or None."""
    return min((i for i in map(text.find, stops) if i >= 0), default=None)


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that a stop sequence begins with."""
    longest = max(map(len, stops), default=1) - 1  # a whole stop is found, not held
    for n in range(min(longest, len(text)), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return n
    return 0


def _complete_text(
    tokenizer, tokens: Iterable[int], eos_id: int | None, stops: Sequence[str]
) -> str:
    """The text of ``tokens`` up to <|endoftext|> or the first stop sequence."""
    data = b""
    for token in tokens:
        if token == eos_id:
            break
        data += tokenizer.decode_bytes([token])
        text = _complete_prefix(data)
        cut = _find_stop(text, stops)  # after every token: a stop ends generation
        if cut is not None:
            return text[:cut]
    text = data.decode("utf-8", "replace")  # as tokenizer.decode does
    cut = _find_stop(text, stops)
    return text if cut is None else text[:cut]


def _text_pieces(
    tokenizer,
    tokens: Iterable[int],
    eos_id: int | None,
    stops: Sequence[str],
    prompt_tokens: int = 0,
) -> Generator[str, None, Completion]:
    """Yield ``_complete_text``'s text in pieces as soon as each piece is final.

    Held back until the next token: an unfinished UTF-8 character at the end (BPE
    tokens are bytes, one character may span two tokens) and an end that a stop
    sequence begins with (the stop may be completed, and it must not be shown).
    """
    data, sent, count, reason = b"", 0, 0, "length"  # sent: characters yielded
    for token in tokens:
        count += 1
        if token == eos_id:
            reason = "stop"
            break
        data += tokenizer.decode_bytes([token])
        text = _complete_prefix(data)
        cut = _find_stop(text, stops)
        if cut is not None:  # cut >= sent: the text after `sent` was held back
            if cut > sent:
                yield text[sent:cut]
            return Completion(text[:cut], "stop", prompt_tokens, count)
        final = len(text) - _stop_prefix_length(text, stops)
        if final > sent:
            yield text[sent:final]
            sent = final
    text = data.decode("utf-8", "replace")
    cut = _find_stop(text, stops)
    if cut is not None:
        text, reason = text[:cut], "stop"
    if len(text) > sent:
        yield text[sent:]
    return Completion(text, reason, prompt_tokens, count)


def complete(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> str:
    """The text generated after ``prompt`` (not the prompt itself).

    It ends at <|endoftext|> or before the first ``stop`` sequence (neither is
    included), else after ``max_new_tokens`` tokens; ``temperature=0`` is greedy and
    ``seed`` makes sampling reproducible. A prompt longer than the model's context
    keeps its last tokens; special tokens in it are allowed.
    """
    stops = check_settings(max_new_tokens, temperature, top_k, top_p, seed, stop)
    eos_id = tokenizer.special_tokens.get(ENDOFTEXT)
    ids = encode_prompt(tokenizer, prompt)
    sampled = _sampled_ids(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id
    )
    with closing(sampled):
        return _complete_text(tokenizer, sampled, eos_id, stops)


def stream_completion(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> Generator[str, None, Completion]:
    """``stream`` whose return value (``StopIteration.value``) is the ``Completion``.

    The settings are checked now, not at the first ``next``.
    """
    stops = check_settings(max_new_tokens, temperature, top_k, top_p, seed, stop)
    eos_id = tokenizer.special_tokens.get(ENDOFTEXT)
    ids = encode_prompt(tokenizer, prompt)

    def pieces() -> Generator[str, None, Completion]:
        sampled = _sampled_ids(
            model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id
        )
        with closing(sampled):
            text = _text_pieces(tokenizer, sampled, eos_id, stops, len(ids))
            return (yield from text)

    return pieces()


def stream(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> Iterator[str]:
    """``complete``'s text in pieces as the tokens arrive: they join to its text.

    Closing the iterator early (``break``) stops generating.
    """
    return stream_completion(
        model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop
    )


def load_model(spec: str, device: str | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: a course model by name ("base", "sft", ...) or folder."""
    from pathlib import Path

    from shared.pretrained import COURSE_MODELS, load_course_model

    if spec in COURSE_MODELS:
        model, tokenizer, _ = load_course_model(device, name=spec)
    elif Path(spec).is_dir():
        model, tokenizer, _ = load_course_model(device, path=spec)
    else:
        raise ValueError(
            f"unknown model {spec!r}: give one of {list(COURSE_MODELS)} or a model "
            "folder (config.json + model.safetensors, or a LoRA adapter)"
        )
    return model, tokenizer


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turn the escapes \n, \t, \r and \\ that a shell passes on unchanged into
    the characters they stand for; any other backslash stays as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m[1]], text)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print the prompt and a model's continuation of it."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m shared.generate",
        description="Continue a prompt with a course model. Prints the prompt, then "
        "the generated text. In --prompt and --stop, \\n \\t \\r and \\\\ are escapes "
        '(a shell passes them unchanged): --prompt "ROMEO:\\n" ends with a newline.',
    )
    parser.add_argument(
        "--prompt",
        type=unescape,
        default="",
        help='text to continue (default "": a new text)',
    )
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument(
        "--model",
        default="base",
        help="base, sft, lora, dpo or a model folder (default base)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)"
    )
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, help="reproducible sampling")
    parser.add_argument(
        "--stop",
        type=unescape,
        action="append",
        default=[],
        help="end before this text (repeatable)",
    )
    parser.add_argument(
        "--stream", action="store_true", help="print the text as it is generated"
    )
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best one)")
    args = parser.parse_args(argv)
    settings = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
    )  # fmt: skip
    try:
        check_settings(**settings)
        model, tokenizer = load_model(args.model, args.device)
    except Exception as err:  # a missing or damaged model folder, a bad device
        parser.error(" ".join(str(err).split()))  # one line, exit code 2
    try:
        if args.stream:
            print(args.prompt, end="", flush=True)
            for piece in stream(model, tokenizer, args.prompt, **settings):
                print(piece, end="", flush=True)
            print()
        else:
            print(args.prompt + complete(model, tokenizer, args.prompt, **settings))
    except KeyboardInterrupt:
        print()
        sys.exit(130)


if __name__ == "__main__":
    main()
