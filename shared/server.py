"""An OpenAI-style server for a course model, on the standard library, with
continuous batching.

    python -m shared.serve --model sft --port 8000   (command line: shared/serve.py)
    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 40}'

* ``POST /v1/completions``: OpenAI's fields ``prompt`` (a string), ``max_tokens``
  (default 16, at most ``MAX_TOKENS``), ``temperature`` (default 1, 0 is greedy),
  ``top_p``, ``stop`` (a string or up to four), ``seed``, ``stream``, ``echo`` and
  ``stream_options.include_usage``; ``top_k`` is an extension. Fields OpenAI has but
  this server does not implement (``n``, ``logprobs``, penalties, ...) are accepted
  at their neutral value and refused otherwise; unknown fields are refused, so a typo
  such as ``max_new_tokens`` is not silently ignored.
* ``POST /v1/chat/completions``: ``messages`` (``{"role", "content"}``, chapter 7's
  roles) instead of a prompt, the same settings (also ``max_completion_tokens``); the
  prompt is ``encode_chat(..., add_generation_prompt=True)`` and the answer ends at
  ``<|end|>``. Only for a model whose tokenizer has the chat tokens (``sft``,
  ``dpo``); the base model answers 400.
* ``stream: true`` answers with server-sent events: one ``data: {chunk}`` per piece of
  text (chat: a ``delta``, the first one carrying the role), a last chunk with
  ``finish_reason``, then ``data: [DONE]``. An error once the stream has begun comes
  as a ``data: {"error": ...}`` event.
* ``GET /v1/models`` lists the one model; ``GET /health`` says it is up (``HEAD``
  answers as ``GET`` without the body, ``OPTIONS`` with the ``Allow`` header).

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with status 400
(bad request), 404, 405 (with ``Allow``), 411, 413, 500, 501 (a method this server
does not know) or 503, also for what the standard library refuses itself (a bad
request line, headers too long), and the server goes on serving.

Requests run in threads, but only one thread runs the model: a
``shared.generation.SchedulerThread`` batches every request in flight, up to
``max_batch`` at once, one token each per forward pass (continuous batching,
``shared/generation/batching.py``). A handler submits its request and waits for
its tokens, or streams them as they come. Beyond the batch, ``max_waiting``
requests may wait for a slot; more are answered at once with 503 and
``Retry-After``. The listen backlog (``request_queue_size``) holds a burst of
connections until they are accepted, so none is reset.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
import uuid
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from torch import nn

from shared.chat import encode_chat, has_chat_tokens, stop_id
from shared.generation import (
    ENDOFTEXT,
    Completion,
    Request,
    SchedulerThread,
    encode_prompt,
    stream_text,
)
from shared.openai_api import (
    MAX_BODY_BYTES,
    ROUTES,
    APIError,
    finish,
    parse_chat_request,
    parse_request,
    usage,
)

MAX_BATCH = 8  # requests generating together, one token each per forward pass
MAX_WAITING = 32  # requests waiting for a place in the batch; more get 503
RETRY_AFTER_S = 1  # what a 503 tells the client to wait before asking again


def check_port(port: int) -> int:
    """``port`` if a server can listen on it (0: any free port), else ValueError."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 to 65535 (0: any free port), got {port}")
    return port


class CompletionHandler(BaseHTTPRequestHandler):
    """One HTTP request: routes, checks, and answers it."""

    server: CompletionServer
    protocol_version = "HTTP/1.1"  # keep-alive; a stream is sent in chunks
    timeout = 60  # seconds a silent (or not reading) client may hold its thread

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_HEAD(self) -> None:  # GET's headers; _send_json leaves out the body
        self._route("HEAD")

    def do_OPTIONS(self) -> None:
        self._route("OPTIONS")

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        """The standard library's own refusals (a bad request line, a method with no
        ``do_`` here, headers too long) as JSON errors, as all others."""
        text = message or self.responses.get(code, ("error",))[0]
        if self.command is None:  # the request line did not parse: its version is
            self.request_version = "HTTP/1.1"  # unknown, HTTP/0.9 would get no headers
        if code == 501:
            text = (
                f"this server answers GET, HEAD, POST and OPTIONS, not {self.command}"
            )
        self._send_error(APIError(code, text))

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path not in ROUTES:
                raise APIError(
                    404,
                    f"unknown path {path}; this server has POST /v1/completions, "
                    "POST /v1/chat/completions, GET /v1/models and GET /health",
                )
            allow = ROUTES[path] + (", HEAD" if ROUTES[path] == "GET" else "")
            allow += ", OPTIONS"
            if method == "OPTIONS":
                self._send_empty(204, {"Allow": allow})
                return
            if method not in allow.split(", "):
                message = f"{path} takes {ROUTES[path]}, not {method}"
                raise APIError(405, message, headers={"Allow": allow})
            if path == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model_name})
            elif path == "/v1/models":
                self._send_json(200, self._models())
            elif path == "/v1/chat/completions":
                self._chat()
            else:
                self._completions()
        except APIError as err:
            self._send_error(err)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client left or stalled: nobody to answer
        except Exception as err:  # a bug or a failing model: say so, keep serving
            traceback.print_exc()
            self._send_error(
                APIError(500, f"{type(err).__name__}: {err}", kind="server_error")
            )

    def _models(self) -> dict:
        model = {
            "id": self.server.model_name,
            "object": "model",
            "created": self.server.created,
            "owned_by": "course",
        }
        return {"object": "list", "data": [model]}

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required")
        if not (length.isascii() and length.isdigit()):
            raise APIError(400, f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY_BYTES:
            raise APIError(
                413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} are read"
            )
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise APIError(400, f"the body is not valid JSON: {err}") from None
        except RecursionError:  # [[[[...]]]] 100,000 deep
            raise APIError(
                400, "the body is not valid JSON: nested too deeply"
            ) from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _completions(self) -> None:
        request = parse_request(self._read_json(), self.server.model_name)
        tokenizer = self.server.tokenizer
        try:
            ids = encode_prompt(tokenizer, request["prompt"])
        except ValueError as err:  # what parse_request let through, e.g. a tokenizer
            raise APIError(400, str(err)) from None
        head = self._head("cmpl", "text_completion")
        echo = request["prompt"] if request["echo"] else ""

        def choice(text: str, finish_reason: str | None = None) -> dict:
            return {
                "text": text,
                "index": 0,
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        eos_id = tokenizer.special_tokens.get(ENDOFTEXT)
        opening = [choice(echo)] if echo else []
        self._answer(request, ids, eos_id, head, choice, opening, echo)

    def _chat(self) -> None:
        request = parse_chat_request(self._read_json(), self.server.model_name)
        tokenizer = self.server.tokenizer
        if not has_chat_tokens(tokenizer):
            raise APIError(
                400,
                f"the model {self.server.model_name!r} has no chat format: its "
                "tokenizer lacks chapter 7's chat tokens (<|user|>, <|assistant|>, "
                "<|end|>); serve a chat model (python -m shared.serve --model sft) "
                "or use /v1/completions",
                "messages",
                code="chat_not_supported",
            )
        ids, _ = encode_chat(tokenizer, request["messages"], add_generation_prompt=True)
        head = self._head("chatcmpl", "chat.completion")

        def choice(text: str, finish_reason: str | None = None) -> dict:
            delta = {"content": text} if text or finish_reason is None else {}
            return {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        opening = [{**role, "logprobs": None, "finish_reason": None}]
        self._answer(request, ids, stop_id(tokenizer), head, choice, opening)

    def _head(self, prefix: str, kind: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": self.server.model_name,
        }

    def _answer(
        self,
        request: dict,
        ids: list[int],
        stop: int | None,
        head: dict,
        choice,
        opening: list[dict],
        echo: str = "",
    ) -> None:
        """Generate through the scheduler; answer in one JSON or as a stream.

        ``choice(text, finish_reason)`` is one streamed choice; ``opening`` the
        choices sent before the first piece (the echo, the chat role).
        """
        pieces = stream_text(
            self.server.engine,
            self.server.tokenizer,
            Request(
                ids,
                request["max_new_tokens"],
                request["temperature"],
                request["top_k"],
                request["top_p"],
                request["seed"],
                stop_ids=() if stop is None else (stop,),
            ),
            request["stop"],
        )
        with closing(pieces), self._queued():
            if request["stream"]:
                if head["object"] == "chat.completion":
                    head = {**head, "object": "chat.completion.chunk"}
                self._stream(pieces, head, choice, opening, request["include_usage"])
                return
            result = finish(pieces)
        if head["object"] == "chat.completion":
            message = {"role": "assistant", "content": result.text}
            answer = {"index": 0, "message": message, "logprobs": None}
        else:
            answer = {"text": echo + result.text, "index": 0, "logprobs": None}
        answer["finish_reason"] = result.finish_reason
        self._send_json(200, {**head, "choices": [answer], "usage": usage(result)})

    @contextmanager
    def _queued(self) -> Iterator[None]:
        """A place in the queue for the model, or 503 when it is full."""
        if not self.server.places.acquire(blocking=False):
            raise APIError(
                503,
                f"{self.server.max_waiting} requests are already waiting for the "
                f"model; retry in {RETRY_AFTER_S} s",
                kind="server_error",
                code="server_overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            yield
        finally:
            self.server.places.release()

    def _stream(
        self,
        pieces: Generator[str, None, Completion],
        head: dict,
        choice,
        opening: list[dict],
        include_usage: bool,
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with closing(pieces):  # a client that leaves ends it (and frees its slot)
            try:
                for first in opening:
                    self._send_event({**head, "choices": [first]})
                while True:
                    try:
                        piece = choice(next(pieces))
                    except StopIteration as end:
                        result: Completion = end.value
                        break
                    self._send_event({**head, "choices": [piece]})
            except (ConnectionError, TimeoutError):
                raise  # the client is gone: closing `pieces` cancels the request
            except Exception as err:  # the status line is sent: report in the stream
                traceback.print_exc()
                error = APIError(
                    500, f"{type(err).__name__}: {err}", kind="server_error"
                )
                self._send_event(error.body())
                self._send_chunk(b"")
                return
        self._send_event({**head, "choices": [choice("", result.finish_reason)]})
        if include_usage:
            self._send_event({**head, "choices": [], "usage": usage(result)})
        self._send_event("[DONE]")
        self._send_chunk(b"")  # the empty chunk ends the response

    def _send_event(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self._send_chunk(f"data: {text}\n\n".encode())

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_json(
        self, status: int, body: dict, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_empty(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_error(self, err: APIError) -> None:
        # close after an error: a body the request sent may be unread on the socket
        self.close_connection = True
        self._send_json(err.status, err.body(), {**err.headers, "Connection": "close"})

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server with the model it serves and the scheduler that runs it."""

    daemon_threads = True  # an open connection never keeps the process alive
    # connections the kernel holds until they are accepted; socketserver's 5 made a
    # burst of 20 lose some to resets (Linux caps it at net.core.somaxconn)
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        model: nn.Module,
        tokenizer,
        model_name: str,
        verbose: bool = False,
        max_waiting: int = MAX_WAITING,
        max_batch: int = MAX_BATCH,
    ) -> None:
        check_port(address[1])
        super().__init__(address, CompletionHandler)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.verbose = verbose
        # max_batch places in the batch, max_waiting for requests waiting for one
        self.max_waiting = max_waiting
        self.places = threading.Semaphore(max_batch + max_waiting)
        self.created = int(time.time())
        self.engine = SchedulerThread(model, max_batch)  # the one thread that decodes

    def server_close(self) -> None:
        super().server_close()
        self.engine.close()


def make_server(
    model: nn.Module,
    tokenizer,
    name: str = "base",
    host: str = "127.0.0.1",
    port: int = 8000,
    verbose: bool = False,
    max_waiting: int = MAX_WAITING,
    max_batch: int = MAX_BATCH,
) -> CompletionServer:
    """A server bound to ``host:port`` (0: any free port, see ``server_address``).

    Call ``serve_forever()`` (in a thread, for tests), then ``shutdown()`` and
    ``server_close()`` (which also stops the scheduler's thread). ``max_batch``
    requests generate together; ``max_waiting`` more may wait for a place in the
    batch; more are refused with 503.
    """
    return CompletionServer(
        (host, port), model, tokenizer, name, verbose, max_waiting, max_batch
    )
