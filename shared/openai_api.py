"""OpenAI's completions and chat completions APIs, the request side: the fields this
course's server accepts, how a request body becomes checked generation settings
(``parse_request``, ``parse_chat_request``), and the error every refusal becomes
(``APIError``, OpenAI's JSON error shape).
The sampling settings are checked by ``shared.generation.check_settings``, the same
function the command line uses."""

from __future__ import annotations

import json
import math
from collections.abc import Generator

from shared.chat import check_messages
from shared.generation import Completion, SettingError, check_settings

MAX_TOKENS = 1024  # per request: bounds how long one request holds the model
MAX_STOPS = 4  # as OpenAI
MAX_BODY_BYTES = 1 << 20
ROUTES = {
    "/health": "GET",
    "/v1/models": "GET",
    "/v1/completions": "POST",
    "/v1/chat/completions": "POST",
}
# OpenAI's fields that only have one value here: accepted at it, refused otherwise
NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "suffix": None,
}
KNOWN = {
    *NEUTRAL,
    *("prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "seed"),
    *("stop", "stream", "stream_options", "echo", "user"),
}
# the chat endpoint's: messages instead of a prompt, no echo or suffix
CHAT_NEUTRAL = {k: v for k, v in NEUTRAL.items() if k not in ("best_of", "suffix")}
CHAT_NEUTRAL |= {"logprobs": False, "top_logprobs": None}
CHAT_KNOWN = {*CHAT_NEUTRAL, *(KNOWN - {"prompt", "echo", *NEUTRAL})}
CHAT_KNOWN |= {"messages", "max_completion_tokens"}
HINTS = {  # other libraries' names for OpenAI's fields
    "max_new_tokens": "max_tokens",
    "max_length": "max_tokens",
    "stop_sequences": "stop",
}


class APIError(Exception):
    """A request that gets an error response: HTTP status and OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind, self.code, self.headers = kind, code, headers or {}

    def body(self) -> dict:
        """The JSON error object OpenAI's clients read."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _shown(value, limit: int = 60) -> str:
    """``value`` as JSON for an error message, cut to ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):  # nested too deeply: name the type only
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(body: dict, key: str, default, integer: bool = False):
    """``body[key]`` as a number (an int if ``integer``; an int too large for a
    float as +-inf), or ``default``; the range is ``check_settings``'s to judge."""
    value = body.get(key)
    if value is None:
        return default
    wanted = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{key} must be {kind}, got {_shown(value)}", key)
    if integer:
        return value
    try:
        float(value)
    except OverflowError:  # an integer beyond float's range, such as 10**400
        return math.inf if value > 0 else -math.inf
    return value


def _flag(body: dict, key: str) -> bool:
    """``body[key]`` as a bool (absent or null: False)."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, got {_shown(value)}", key)
    return bool(value)


def _stops(value) -> list[str]:
    """The ``stop`` field as a list of strings."""
    stops = [value] if isinstance(value, str) else value
    if value is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:  # OpenAI's limit; an empty one check_settings refuses
        raise APIError(
            400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop"
        )
    return stops


def _check_fields(body: dict, known: set[str], neutral: dict) -> None:
    """Refuse unknown fields and OpenAI's fields at a value this server lacks."""
    for key in body:
        if key not in known:
            hint = f"; did you mean {HINTS[key]!r}?" if key in HINTS else ""
            name = key if len(key) <= 60 else key[:57] + "..."
            raise APIError(400, f"unknown field {name!r}{hint}", name)
    for key, value in neutral.items():
        if body.get(key, value) not in (value, None):
            shown = _shown(body[key])
            message = f"{key}={shown} is not supported (only {json.dumps(value)})"
            raise APIError(400, message, key)


def _settings(body: dict, model_name: str, max_tokens_key: str = "max_tokens") -> dict:
    """The checked settings both endpoints share: model, sampling, stop, stream."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"the model {_shown(model)} does not exist; this server has {model_name!r}",
            "model",
            code="model_not_found",
        )
    max_tokens = _number(body, max_tokens_key, 16, integer=True)
    if not 1 <= max_tokens <= MAX_TOKENS:  # 10**400 too: compared as an int
        message = (
            f"{max_tokens_key} must be 1 to {MAX_TOKENS}, got {_shown(max_tokens)}"
        )
        raise APIError(400, message, max_tokens_key)
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _number(body, "top_k", None, integer=True)
    seed = _number(body, "seed", None, integer=True)
    stops = _stops(body.get("stop"))
    try:  # the same checks as the command line's
        check_settings(max_tokens, temperature, top_k, top_p, seed, stops)
    except SettingError as err:
        raise APIError(400, str(err), err.param) from None
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(
            400, 'stream_options takes only {"include_usage": bool}', "stream_options"
        )
    return {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": None if top_p == 1 else top_p,
        "seed": seed,
        "stop": stops,
        "stream": _flag(body, "stream"),
        "include_usage": _flag(options, "include_usage"),
    }


def parse_request(body: dict, model_name: str) -> dict:
    """The checked settings of a completion request; ``APIError`` says what is wrong."""
    _check_fields(body, KNOWN, NEUTRAL)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        message = "prompt is required" if prompt is None else "prompt must be a string"
        if isinstance(prompt, list):
            message += " (a list of prompts or of token ids is not supported)"
        raise APIError(400, message, "prompt")
    settings = _settings(body, model_name)
    return {"prompt": prompt, **settings, "echo": _flag(body, "echo")}


def _joined(message):
    """``message`` with OpenAI's list of text parts as content joined into one
    string; anything else unchanged (``check_messages`` judges it)."""
    parts = message.get("content") if isinstance(message, dict) else None
    if isinstance(parts, list) and all(
        isinstance(p, dict)
        and p.get("type") == "text"
        and isinstance(p.get("text"), str)
        for p in parts
    ):
        return {**message, "content": "".join(p["text"] for p in parts)}
    return message


def parse_chat_request(body: dict, model_name: str) -> dict:
    """The checked messages and settings of a chat completion request."""
    _check_fields(body, CHAT_KNOWN, CHAT_NEUTRAL)
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [_joined(m) for m in messages]
    try:
        check_messages(messages, add_generation_prompt=True)
    except ValueError as err:
        raise APIError(400, str(err), "messages") from None
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return {"messages": messages, **_settings(body, model_name, key)}


def usage(result: Completion) -> dict:
    """OpenAI's token counts of a completion."""
    total = result.prompt_tokens + result.completion_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": total,
    }


def finish(pieces: Generator[str, None, Completion]) -> Completion:
    """Run ``pieces`` to the end; its return value."""
    while True:
        try:
            next(pieces)
        except StopIteration as end:
            return end.value
