"""An OpenAI-style completions server for a course model, on the standard library.

    python -m shared.serve --model base --port 8000   (command line: shared/serve.py)
    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 40}'

* ``POST /v1/completions``: OpenAI's fields ``prompt`` (a string), ``max_tokens``
  (default 16, at most ``MAX_TOKENS``), ``temperature`` (default 1, 0 is greedy),
  ``top_p``, ``stop`` (a string or up to four), ``seed``, ``stream``, ``echo`` and
  ``stream_options.include_usage``; ``top_k`` is an extension. Fields OpenAI has but
  this server does not implement (``n``, ``logprobs``, penalties, ...) are accepted
  at their neutral value and refused otherwise; unknown fields are refused, so a typo
  such as ``max_new_tokens`` is not silently ignored.
* ``stream: true`` answers with server-sent events: one ``data: {chunk}`` per piece of
  text, a last chunk with ``finish_reason``, then ``data: [DONE]``. An error once the
  stream has begun comes as a ``data: {"error": ...}`` event.
* ``GET /v1/models`` lists the one model; ``GET /health`` says it is up.

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with status 400
(bad request), 404, 405, 411, 413 or 500, and the server goes on serving. Requests
run in threads, but generation holds ``server.lock``: one completion at a time, so
the model (its mode, a KV cache) is never used by two threads at once; on two CPU
cores parallel generations would only share the same cores anyway.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
import uuid
from collections.abc import Generator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from torch import nn

from shared.generation import Completion, stream_completion
from shared.openai_api import (
    MAX_BODY_BYTES,
    ROUTES,
    APIError,
    finish,
    parse_request,
    usage,
)


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

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path not in ROUTES:
                raise APIError(
                    404,
                    f"unknown path {path}; this server has POST /v1/completions, "
                    "GET /v1/models and GET /health",
                )
            if method != ROUTES[path]:
                allow = {"Allow": ROUTES[path]}
                message = f"{path} takes {ROUTES[path]}, not {method}"
                raise APIError(405, message, headers=allow)
            if path == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model_name})
            elif path == "/v1/models":
                self._send_json(200, self._models())
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
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _completions(self) -> None:
        request = parse_request(self._read_json(), self.server.model_name)
        settings = {
            key: request[key]
            for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
        }
        model, tokenizer = self.server.model, self.server.tokenizer
        try:
            pieces = stream_completion(
                model, tokenizer, request["prompt"], stop=request["stop"], **settings
            )
        except ValueError as err:  # what parse_request let through, e.g. a tokenizer
            raise APIError(400, str(err)) from None
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.model_name,
        }
        echo = request["prompt"] if request["echo"] else ""
        if request["stream"]:
            self._stream(pieces, head, echo, request["include_usage"])
            return
        with self.server.lock, closing(pieces):
            result = finish(pieces)
        choice = {
            "text": echo + result.text,
            "index": 0,
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        self._send_json(200, {**head, "choices": [choice], "usage": usage(result)})

    def _stream(
        self,
        pieces: Generator[str, None, Completion],
        head: dict,
        echo: str,
        include_usage: bool,
    ) -> None:
        def chunk(text: str, finish_reason: str | None = None) -> dict:
            choice = {
                "text": text,
                "index": 0,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return {**head, "choices": [choice]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with self.server.lock, closing(pieces):  # a client that leaves ends it
            try:
                if echo:
                    self._send_event(chunk(echo))
                while True:
                    try:
                        self._send_event(chunk(next(pieces)))
                    except StopIteration as end:
                        result: Completion = end.value
                        break
            except (ConnectionError, TimeoutError):
                raise  # the client is gone: closing `pieces` stops generating
            except Exception as err:  # the status line is sent: report in the stream
                traceback.print_exc()
                error = APIError(
                    500, f"{type(err).__name__}: {err}", kind="server_error"
                )
                self._send_event(error.body())
                self._send_chunk(b"")
                return
        self._send_event(chunk("", result.finish_reason))
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
        self.wfile.write(data)

    def _send_error(self, err: APIError) -> None:
        # close after an error: a body the request sent may be unread on the socket
        self.close_connection = True
        self._send_json(err.status, err.body(), {**err.headers, "Connection": "close"})

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server with the model it serves and the lock that guards it."""

    daemon_threads = True  # an open connection never keeps the process alive

    def __init__(
        self,
        address: tuple[str, int],
        model: nn.Module,
        tokenizer,
        model_name: str,
        verbose: bool = False,
    ) -> None:
        super().__init__(address, CompletionHandler)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.verbose = verbose
        self.lock = threading.Lock()  # one generation at a time (see the docstring)
        self.created = int(time.time())


def make_server(
    model: nn.Module,
    tokenizer,
    name: str = "base",
    host: str = "127.0.0.1",
    port: int = 8000,
    verbose: bool = False,
) -> CompletionServer:
    """A server bound to ``host:port`` (0: any free port, see ``server_address``).

    Call ``serve_forever()`` (in a thread, for tests), then ``shutdown()`` and
    ``server_close()``.
    """
    return CompletionServer((host, port), model, tokenizer, name, verbose)
