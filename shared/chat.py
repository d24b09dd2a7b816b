"""The course's chat format: role markers as special tokens, loss on assistant turns.

A conversation is a list of OpenAI-shaped messages, ``{"role": ..., "content": ...}``
with ``role`` in system / user / assistant. Each message becomes its role marker,
its content and the end-of-turn marker; nothing else is added::

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

Why special tokens, not text markers such as Alpaca's ``### Response:`` (``sft.py``)?

* No user can forge a turn. Encoding text never produces a special id unless the
  caller allows it (``BPETokenizer.encode``), and ``encode_chat`` encodes every
  content as plain text: a message that contains the string ``<|assistant|>`` is
  ten ordinary tokens, not the marker the model learned to obey.
* The markers are token boundaries, so no separator text (newlines) is needed, and a
  content's ids do not depend on what stands around it: the ids of the generation
  prompt ``...<|assistant|>`` are exactly the start of the trained sequence.

New tokens need new rows in the model: ``with_chat_tokens`` appends the four markers
after the tokenizer's last id (every old id keeps its meaning), and
``grow_embeddings(model, len(CHAT_TOKENS))`` adds their embedding (and output) rows
(a model whose vocabulary is padded past the tokenizer's may have rows to spare:
it needs ``tokenizer.vocab_size - model.config.vocab_size`` more, if that is > 0).
``CHAT_TEMPLATE`` is the same format as a Jinja template, the ``chat_template`` of a
Hugging Face tokenizer: ``shared.hf_export`` writes it into every export whose
tokenizer has the chat tokens, so the format travels with the model.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from shared import sft
from shared.model import GPT
from shared.sft import IGNORE
from shared.tokenizer import BPETokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
MARKERS = {role: f"<|{role}|>" for role in ROLES}
CHAT_TOKENS = (*MARKERS.values(), END)  # the order in which they get their ids

# The same text as format_chat, for Hugging Face's ``apply_chat_template`` (tested).
# ``{% generation %}`` marks what the model is trained on, so that
# ``return_assistant_tokens_mask=True`` gives the mask of ``encode_chat``'s labels.
CHAT_TEMPLATE = """\
{%- set roles = ['system', 'user', 'assistant'] -%}
{%- if not messages -%}
    {{- raise_exception('a conversation needs at least one message') -}}
{%- endif -%}
{%- set first = 1 if messages[0]['role'] == 'system' else 0 -%}
{%- for message in messages -%}
    {%- set k = loop.index0 - first -%}
    {%- if message['role'] not in roles -%}
        {{- raise_exception('unknown role: ' + message['role']|string) -}}
    {%- elif k >= 0 and message['role'] != ['user', 'assistant'][k % 2] -%}
        {{- raise_exception('roles must be: system (optional), then user and '
                            'assistant in turn, starting with user') -}}
    {%- elif message['content'] is not string -%}
        {{- raise_exception('content must be a string') -}}
    {%- endif -%}
    {{- '<|' + message['role'] + '|>' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}
    {%- else -%}
        {{- message['content'] + '<|end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if messages|length == first -%}
    {{- raise_exception('a conversation needs a user message') -}}
{%- endif -%}
{%- if add_generation_prompt -%}
    {%- if messages[-1]['role'] != 'user' -%}
        {{- raise_exception('a generation prompt follows a user message') -}}
    {%- endif -%}
    {{- '<|assistant|>' -}}
{%- endif -%}"""


# ---------------------------------------------------------------------------- tokens


def with_chat_tokens(tokenizer: BPETokenizer) -> BPETokenizer:
    """A copy of ``tokenizer`` with ``CHAT_TOKENS`` as special tokens after its last id.

    Every existing id keeps its meaning, so a model trained with ``tokenizer`` reads
    the same text the same way; it needs ``len(CHAT_TOKENS)`` new embedding rows
    (``grow_embeddings``) before it can see the new ids. A tokenizer that has the
    chat tokens already is returned as it is.
    """
    present = [t for t in CHAT_TOKENS if t in tokenizer.special_tokens]
    if len(present) == len(CHAT_TOKENS):
        return tokenizer
    if present:
        raise ValueError(
            f"the tokenizer has some chat tokens ({present}) but not all of "
            f"{list(CHAT_TOKENS)}: build it again from the tokenizer without them"
        )
    taken = [len(tokenizer.vocab) - 1, *tokenizer.special_tokens.values()]
    first = max(taken) + 1
    specials = dict(tokenizer.special_tokens)
    specials |= {t: first + i for i, t in enumerate(CHAT_TOKENS)}
    merges = [pair for pair, _ in sorted(tokenizer.merges.items(), key=lambda x: x[1])]
    return BPETokenizer(merges, specials, tokenizer.pattern, tokenizer.byte_order)


def has_chat_tokens(tokenizer) -> bool:
    """Does ``tokenizer`` know every chat marker as a special token?"""
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def chat_ids(tokenizer) -> dict[str, int]:
    """The id of each chat token, e.g. ``chat_ids(tok)["<|end|>"]`` to stop decoding."""
    if not has_chat_tokens(tokenizer):
        raise ValueError(
            f"the tokenizer has no chat tokens {list(CHAT_TOKENS)}: use "
            "shared.chat.with_chat_tokens(tokenizer) (and grow the model's embeddings)"
        )
    return {t: tokenizer.special_tokens[t] for t in CHAT_TOKENS}


@torch.no_grad()
def grow_embeddings(model: GPT, n_new: int) -> GPT:
    """Give ``model`` ``n_new`` more token ids, each row set to the mean of the old.

    Old rows are kept exactly, so old inputs give the same logits over the old
    vocabulary. Initialising new rows to the mean of the existing embeddings is a
    common choice (Hewitt, "Initializing new word embeddings for pretrained language
    models", 2021; ``transformers``' ``resize_token_embeddings(mean_resizing=True)``
    starts from the same mean): a new token's logit is then the mean of the old
    logits, so it starts out no likelier than an average token and the model's
    predictions barely move. A tied output head stays tied (the new head *is* the
    new embedding); an untied one grows the same way. Grow before building the
    optimizer: its state refers to the old tensors. Returns ``model``.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if n_new == 0:
        return model

    def grown(weight: torch.Tensor) -> nn.Parameter:
        mean = weight.mean(dim=0, keepdim=True).expand(n_new, -1)
        new = nn.Parameter(torch.cat([weight, mean]))
        new.requires_grad_(weight.requires_grad)  # a frozen table stays frozen
        return new

    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    wte.weight = grown(wte.weight)
    wte.num_embeddings = wte.weight.size(0)
    head.weight = wte.weight if tied else grown(head.weight)
    head.out_features = head.weight.size(0)
    model.config = dataclasses.replace(model.config, vocab_size=wte.num_embeddings)
    return model


# ---------------------------------------------------------------------------- format


def check_messages(
    messages: Sequence[Mapping], add_generation_prompt: bool = False
) -> None:
    """Raise ValueError unless ``messages`` is a conversation the format can hold.

    The rules: a list of ``{"role", "content"}`` dicts with string contents; an
    optional system message first, then user and assistant in turn, starting with
    user; a generation prompt only after a user message.
    """
    if isinstance(messages, str | bytes | Mapping) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    for i, message in enumerate(messages):
        if not (isinstance(message, Mapping) and {"role", "content"} <= message.keys()):
            raise ValueError(f"message {i} is not a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; roles are {ROLES}")
        if not isinstance(content, str):
            raise ValueError(
                f"message {i} ({role}) has content of type {type(content).__name__}; "
                "the format holds text only (a str)"
            )
    first = 1 if messages[0]["role"] == "system" else 0
    for k, message in enumerate(messages[first:]):
        expected = ("user", "assistant")[k % 2]
        if message["role"] != expected:
            raise ValueError(
                f"message {first + k} is {message['role']!r} where {expected!r} is "
                "expected: a conversation is an optional system message, then user "
                "and assistant in turn, starting with user"
            )
    if len(messages) == first:
        raise ValueError("a conversation needs a user message after the system one")
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ValueError(
            "add_generation_prompt=True asks the assistant to answer, but the last "
            f"message is {messages[-1]['role']!r}, not 'user'"
        )


def format_chat(
    messages: Sequence[Mapping], add_generation_prompt: bool = False
) -> str:
    """The conversation as text: ``<|role|>content<|end|>`` per message.

    With ``add_generation_prompt`` the text ends with ``<|assistant|>``, so a model
    continues as the assistant. The text is for reading and for Hugging Face's
    template; to get ids use ``encode_chat``: encoding this text with the markers
    allowed would also turn a marker typed inside a message into a real one.
    """
    check_messages(messages, add_generation_prompt)
    turns = [MARKERS[m["role"]] + m["content"] + END for m in messages]
    return "".join(turns) + (MARKERS["assistant"] if add_generation_prompt else "")


def encode_chat(
    tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of ``format_chat(messages)`` and their labels (loss on the assistant).

    Markers become their special ids; contents are encoded as plain text, so a
    marker written inside a message stays text. ``labels[i]`` is ``ids[i]`` on each
    assistant content and the ``<|end|>`` that closes it (the model learns to answer
    and to stop), -100 (``shared.sft.IGNORE``) everywhere else: markers, system and
    user turns. ``sft.collate`` shifts them into next-token targets.
    """
    check_messages(messages, add_generation_prompt)
    special = chat_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        marker = special[MARKERS[message["role"]]]
        content = tokenizer.encode(message["content"], disallowed_special=())
        turn = content + [special[END]]
        trained = message["role"] == "assistant"
        ids += [marker] + turn
        labels += [IGNORE] + (turn if trained else [IGNORE] * len(turn))
    if add_generation_prompt:
        ids.append(special[MARKERS["assistant"]])
        labels.append(IGNORE)
    return ids, labels


# ---------------------------------------------------------------- instruction tasks
# Chapter 07's instruction examples as conversations. A tokenizer with the chat tokens
# gets the chat format; one without them gets the text template of ``sft.py``, so the
# same functions serve the base model, LoRA (which cannot train new embedding rows)
# and the chat models.


def instruction_messages(instruction: str, input: str) -> list[dict[str, str]]:
    """One user turn: the instruction, a newline, the input."""
    return [{"role": "user", "content": f"{instruction}\n{input}"}]


def stop_id(tokenizer) -> int:
    """The id that ends a response: ``<|end|>`` in the chat format, else
    ``<|endoftext|>``."""
    if has_chat_tokens(tokenizer):
        return chat_ids(tokenizer)[END]
    return sft.eos_id(tokenizer)


def prompt_ids(tokenizer, instruction: str, input: str) -> list[int]:
    """The ids a model continues to answer: the chat generation prompt (ending in
    ``<|assistant|>``) or the text template's ``### Response:``."""
    if has_chat_tokens(tokenizer):
        return encode_chat(tokenizer, instruction_messages(instruction, input), True)[0]
    return tokenizer.encode(sft.format_prompt(instruction, input))


def encode_instruction(
    tokenizer, instruction: str, input: str, response: str, mask_prompt: bool = True
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of prompt + response + end marker (``sft.encode_example`` in
    either format); ``mask_prompt=False`` trains on every token."""
    if not has_chat_tokens(tokenizer):
        prompt = sft.format_prompt(instruction, input)
        return sft.encode_example(tokenizer, prompt, response, mask_prompt)
    messages = instruction_messages(instruction, input)
    messages.append({"role": "assistant", "content": response})
    ids, labels = encode_chat(tokenizer, messages)
    return ids, (labels if mask_prompt else list(ids))


def encode_examples(
    tokenizer,
    examples: Sequence,
    mask_prompt: bool = True,
    max_turns: int = 1,
    context_length: int = 128,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """Every example encoded, in conversations of 1 to ``max_turns`` user/assistant
    exchanges (chat format only; each conversation fits ``context_length + 1``).

    Conversations are filled in a seeded order: an example joins the open one when
    the dice say so and it fits, else starts the next. The loss covers every
    assistant turn, so a later answer is learned with earlier turns in view.
    """
    if max_turns == 1 or not has_chat_tokens(tokenizer):
        return [encode_instruction(tokenizer, e.instruction, e.input, e.output,
                                   mask_prompt) for e in examples]  # fmt: skip
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    out: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    turns = 0
    for i in order:
        e = examples[i]
        one = encode_instruction(
            tokenizer, e.instruction, e.input, e.output, mask_prompt
        )
        joins = 0 < turns < max_turns and rng.random() < 0.5
        if joins and len(ids) + len(one[0]) <= context_length + 1:
            ids, labels, turns = ids + one[0], labels + one[1], turns + 1
            continue
        if ids:
            out.append((ids, labels))
        ids, labels, turns = list(one[0]), list(one[1]), 1
    out.append((ids, labels))
    return out
