"""Text in, text out: ``complete``/``stream``, the command line and the HTTP server.

The command line and the server must give exactly ``complete``'s text, and ``stream``
its text in pieces, whatever the tokens split: a multi-byte character, a stop sequence.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

from shared.chat import encode_chat, stop_id
from shared.data import REPO_ROOT
from shared.generate import main
from shared.generation import (
    complete,
    generate,
    stream,
    stream_completion,
    unescape,
)
from shared.generation.text import _complete_text, _text_pieces
from shared.openai_api import MAX_TOKENS, finish
from shared.pretrained import load_course_model
from shared.server import make_server

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def course():
    model, tokenizer, _ = load_course_model("cpu")
    return model, tokenizer


def generated_text(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy text straight from ``generate``, up to <|endoftext|>."""
    eos = tokenizer.special_tokens["<|endoftext|>"]
    ids = tokenizer.encode(prompt)
    out = generate(model, torch.tensor([ids]), n, temperature=0, eos_id=eos)
    new = out[0, len(ids) :].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new)


# ------------------------------------------------------------ complete and stream


def test_command_line_greedy_equals_complete_and_generate(course):
    model, tokenizer = course
    text = complete(model, tokenizer, "ROMEO:\n", 30, temperature=0)
    assert text and text == generated_text(model, tokenizer, "ROMEO:\n", 30)
    command = [sys.executable, "-m", "shared.generate", "--prompt", r"ROMEO:\n"]
    command += ["--max-new-tokens", "30", "--temperature", "0", "--device", "cpu"]
    run = subprocess.run(
        command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ROMEO:\n" + text + "\n"  # the prompt, then the text


def test_command_line_stream_and_stop(course, capsys):
    model, tokenizer = course
    base = ["--prompt", "ROMEO:", "--max-new-tokens", "30", "--device", "cpu"]
    for extra in (["--temperature", "0"], ["--seed", "3", "--stop", r"\n\n"]):
        main([*base, *extra])
        printed = capsys.readouterr().out
        main([*base, *extra, "--stream"])
        assert capsys.readouterr().out == printed
    # the escape is a newline: sampling stopped before a blank line
    text = complete(model, tokenizer, "ROMEO:", 30, 0.8, seed=3, stop="\n\n")
    assert printed == "ROMEO:" + text + "\n" and "\n\n" not in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "0"], "top_k must be >= 1"),
        (["--stop", ""], "stop sequence must not be empty"),
        (["--max-new-tokens", "x"], "invalid int value"),
    ],
)
def test_command_line_errors_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after argparse's usage lines
    assert last.startswith("python -m shared.generate: error: ") and message in last
    assert "Traceback" not in err


def test_command_line_model_folder_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path)])
    assert exit_.value.code == 2 and "holds no model" in capsys.readouterr().err


def test_unescape():
    assert unescape(r"ROMEO:\n\tA\\nB\x") == "ROMEO:\n\tA\\nB\\x"


def test_seeded_sampling_is_reproducible(course):
    model, tokenizer = course
    a, b, c = (complete(model, tokenizer, "JULIET:", 30, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    top = complete(model, tokenizer, "JULIET:", 30, top_k=5, top_p=0.9, seed=1)
    assert top == complete(model, tokenizer, "JULIET:", 30, top_k=5, top_p=0.9, seed=1)


def test_stop_sequences_cut_also_across_tokens(course):
    model, tokenizer = course
    full = complete(model, tokenizer, "ROMEO:", 30, temperature=0)
    ids = tokenizer.encode("ROMEO:")
    new = generate(model, torch.tensor([ids]), 30, temperature=0)[0, len(ids) :]
    pieces = [tokenizer.decode([i]) for i in new.tolist()]
    # the end of one token and the start of the next: a stop no token contains
    j = next(j for j in range(5, 29) if min(map(len, pieces[j : j + 2])) >= 2)
    spanning = pieces[j][-2:] + pieces[j + 1][:2]
    cut = full.find(spanning)
    assert cut > 0
    assert complete(model, tokenizer, "ROMEO:", 30, 0, stop=spanning) == full[:cut]
    # several stops: the earliest one wins, whatever the order
    early = full[3:5]
    got = complete(model, tokenizer, "ROMEO:", 30, 0, stop=[spanning, early])
    assert got == full[: full.find(early)]


@pytest.mark.parametrize("seed", [0, 1])
def test_stream_joins_to_complete(course, seed):
    model, tokenizer = course
    cases = [
        ("ROMEO:", {}),
        ("KING HENRY:\n", {"stop": ["\n\n", "the"], "top_k": 40}),
        ("", {"stop": ":", "top_p": 0.9}),  # "" starts from <|endoftext|>
        ("First Citizen:", {"stop": ["e", "ee"], "temperature": 1.5}),
    ]
    for prompt, kw in cases:
        kw = {"max_new_tokens": 30, "seed": seed, **kw}
        pieces = list(stream(model, tokenizer, prompt, **kw))
        text = complete(model, tokenizer, prompt, **kw)
        assert "".join(pieces) == text
        assert all(pieces)  # no empty pieces
        for stop in kw.get("stop", ()):
            assert stop not in text


def test_long_prompt_is_cropped_and_max_new_tokens_is_not(course):
    model, tokenizer = course
    context = model.config.context_length
    long = "ROMEO:\nO, she doth teach the torches to burn bright!\n" * 30
    ids = tokenizer.encode(long)
    assert len(ids) > 2 * context
    cropped = tokenizer.decode(ids[-context:])
    got = complete(model, tokenizer, long, 5, temperature=0)
    assert got == complete(model, tokenizer, cropped, 5, temperature=0)
    # generating past the window (the shipped model's greedy text has no end there)
    pieces = stream_completion(model, tokenizer, "ROMEO:", context + 8, temperature=0)
    result = finish(pieces)
    assert result.finish_reason == "length" and result.completion_tokens == context + 8
    assert len(result.text) > context


# the text assembly alone, on scripted tokens: characters split into bytes


def test_pieces_hold_back_split_characters_and_stop_prefixes(course):
    _, tokenizer = course
    byte_id = {b: i for i, b in tokenizer.vocab.items() if len(b) == 1}

    def ids(data: bytes) -> list[int]:
        return [byte_id[data[i : i + 1]] for i in range(len(data))]

    eos = tokenizer.special_tokens["<|endoftext|>"]
    tokens = ids("café 😀 ab".encode()) + [eos] + ids(b"after")
    pieces = list(_text_pieces(tokenizer, iter(tokens), eos, ()))
    assert "".join(pieces) == "café 😀 ab"
    assert "é" in pieces and "😀" in pieces  # whole characters, never U+FFFD
    # a stop made of split characters, found across six tokens and never shown
    tokens = ids("dîner 😀é fin".encode())
    pieces = list(_text_pieces(tokenizer, iter(tokens), eos, ["😀é"]))
    assert pieces == ["d", "î", "n", "e", "r", " "]
    # broken UTF-8 becomes U+FFFD as in tokenizer.decode
    tokens = ids(b"a\x80b\xe2\x82")
    assert "".join(_text_pieces(tokenizer, iter(tokens), eos, ())) == "a\ufffdb\ufffd"

    rng = random.Random(0)
    alphabet = [*"ab \n", "é", "😀", "ab", "ba"]
    for _ in range(300):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        data = text.encode()
        if rng.random() < 0.2:
            data = data[: rng.randint(0, len(data))]  # maybe mid-character
        tokens = ids(data) + ([eos] if rng.random() < 0.3 else [])
        if rng.random() < 0.3:
            tokens.insert(rng.randint(0, len(tokens)), eos)
        words = [text[i : i + rng.randint(1, 4)] for i in range(0, len(text), 3)]
        stops = rng.sample(words, min(len(words), rng.randint(0, 3))) or ["ab"]
        expected = _complete_text(tokenizer, iter(tokens), eos, stops)
        gen = _text_pieces(tokenizer, iter(tokens), eos, stops, prompt_tokens=7)
        pieces = []
        while True:
            try:
                pieces.append(next(gen))
            except StopIteration as end:  # its return value: the Completion
                result = end.value
                break
        assert "".join(pieces) == expected == result.text
        assert all(pieces) and result.prompt_tokens == 7
        assert not any(stop in expected for stop in stops)
        before_eos = tokens[: tokens.index(eos)] if eos in tokens else tokens
        whole = tokenizer.decode(before_eos)
        stopped = eos in tokens or any(stop in whole for stop in stops)
        assert result.finish_reason == ("stop" if stopped else "length")


# ------------------------------------------------------------ the HTTP server


@pytest.fixture(scope="module")
def server(course):
    model, tokenizer = course
    httpd = make_server(model, tokenizer, "base", "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def request(url: str, body=None, method: str | None = None, raw: bytes | None = None):
    """(status, headers, decoded body) of one HTTP request; errors are answers too."""
    data = raw if raw is not None else None if body is None else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def events(body: str) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream."""
    blocks = [b for b in body.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [b.removeprefix("data: ") for b in blocks]


def test_server_completion_equals_complete(course, server):
    model, tokenizer = course
    status, _, body = request(
        f"{server}/v1/completions",
        {"prompt": "ROMEO:", "max_tokens": 25, "temperature": 0, "model": "base"},
    )
    assert status == 200
    answer = json.loads(body)
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert answer["model"] == "base" and isinstance(answer["created"], int)
    (choice,) = answer["choices"]
    assert choice["text"] == complete(model, tokenizer, "ROMEO:", 25, temperature=0)
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    prompt_tokens = len(tokenizer.encode("ROMEO:"))
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 25,
        "total_tokens": prompt_tokens + 25,
    }
    kw = {"max_new_tokens": 40, "seed": 5, "stop": ["\n\n", "the"]}
    body = {"prompt": "KING:", "max_tokens": 40, "seed": 5, "stop": ["\n\n", "the"]}
    answer = json.loads(request(f"{server}/v1/completions", body)[2])
    assert answer["choices"][0]["text"] == complete(model, tokenizer, "KING:", **kw)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] <= 40
    body["echo"] = True
    answer = json.loads(request(f"{server}/v1/completions", body)[2])
    assert answer["choices"][0]["text"] == "KING:" + complete(
        model, tokenizer, "KING:", **kw
    )


def test_server_crops_long_prompts_and_generates_past_the_window(course, server):
    model, tokenizer = course
    context = model.config.context_length
    long = "ROMEO:\nO, she doth teach the torches to burn bright!\n" * 30
    for prompt, n in ((long, 5), ("ROMEO:", context + 8)):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        answer = json.loads(request(f"{server}/v1/completions", body)[2])
        assert answer["choices"][0]["text"] == complete(model, tokenizer, prompt, n, 0)
        assert answer["usage"]["completion_tokens"] == n


def test_server_streams_server_sent_events(course, server):
    model, tokenizer = course
    body = {"prompt": "ROMEO:", "max_tokens": 30, "seed": 2, "stop": "\n\n"}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    status, headers, text = request(f"{server}/v1/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    data = events(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage = chunks.pop()  # asked for: a last chunk with no choices, the counts
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 2
    *pieces, last = [c["choices"][0] for c in chunks]
    assert last["text"] == "" and last["finish_reason"] in ("stop", "length")
    assert all(p["finish_reason"] is None for p in pieces)
    expected = complete(model, tokenizer, "ROMEO:", 30, seed=2, stop="\n\n")
    assert "".join(p["text"] for p in pieces) == expected
    assert len({c["id"] for c in chunks}) == 1


def test_server_keeps_connections_alive(course, server):
    model, tokenizer = course
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for stream_ in (True, False, True):
            body = {"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}
            conn.request(
                "POST", "/v1/completions", json.dumps(body | {"stream": stream_})
            )
            response = conn.getresponse()
            text = response.read().decode()
            assert response.status == 200
            if stream_:
                chunks = [json.loads(d) for d in events(text)[:-1]]
                text = "".join(c["choices"][0]["text"] for c in chunks)
            else:
                text = json.loads(text)["choices"][0]["text"]
            assert text == complete(model, tokenizer, "ROMEO:", 5, temperature=0)
    finally:
        conn.close()


def test_server_models_and_health(server):
    status, _, body = request(f"{server}/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["base"]
    status, _, body = request(f"{server}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


BAD = [  # (method, path, body, status, words of the message)
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/completions", {"max_tokens": 5}, 400, "prompt is required"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt must be a str"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": MAX_TOKENS + 1}, 400,
     "max_tokens must be 1 to"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": "9"}, 400,
     "max_tokens must be an integer"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": True}, 400, "integer"),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": -1}, 400,
     "temperature must be >= 0"),
    ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p must be in"),
    ("POST", "/v1/completions", {"prompt": "a", "top_k": 0}, 400, "top_k must be"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": [""]}, 400, "not be empty"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": list("abcde")}, 400,
     "at most 4"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": 5}, 400, "stop must be"),
    ("POST", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "true or false"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 2}, 400, "n=2 is not supported"),
    ("POST", "/v1/completions", {"prompt": "a", "max_new_tokens": 5}, 400,
     "did you mean 'max_tokens'"),
    ("POST", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404,
     "does not exist"),
    ("GET", "/v1/completions", None, 405, "takes POST"),
    ("POST", "/health", {}, 405, "takes GET"),
    ("DELETE", "/v1/models", None, 405, "takes GET"),
    ("POST", "/v1/chat/completions", {"prompt": "a"}, 400, "unknown field 'prompt'"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]},
     400, "has no chat format"),  # the base model: no chat tokens
    ("POST", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "a"}]},
     400, "roles are"),
    ("GET", "/v1/chat", None, 404, "unknown path"),
    ("POST", "/v1/chat/completions", {}, 400, "messages must be a non-empty list"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400,
     "is not a dict with 'role' and 'content'"),
    ("POST", "/v1/chat/completions", {"messages": [], "max_completion_tokens": 0},
     400, "messages must be"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
     "max_completion_tokens": 0}, 400, "max_completion_tokens must be 1 to"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
     "logprobs": True}, 400, "logprobs=true is not supported"),
    ("GET", "/", None, 404, "unknown path"),
]  # fmt: skip


@pytest.mark.parametrize("method, path, body, status, words", BAD)
def test_server_bad_requests(course, server, method, path, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, _, text = request(f"{server}{path}", body, method, raw)
    assert got == status
    error = json.loads(text)["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    # and the server answers the next good request
    status, _, text = request(
        f"{server}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3}
    )
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 3


def test_server_refuses_a_large_body_unread(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", str(100 * 2**20))
        conn.endheaders()  # and no body: the server must answer without reading it
        response = conn.getresponse()
        assert response.status == 413
        assert "at most" in json.loads(response.read())["error"]["message"]
    finally:
        conn.close()


def test_server_batches_concurrent_requests_in_one_thread(course, server):
    model, tokenizer = course
    inside, most, calls, count_lock = 0, 0, 0, threading.Lock()
    forward = model.forward

    def counted_forward(*args, **kwargs):
        """The model's forward, counting how many run at the same time."""
        nonlocal inside, most, calls
        with count_lock:
            inside, calls = inside + 1, calls + 1
            most = max(most, inside)
        try:
            time.sleep(0.002)  # a window in which an unguarded request would enter
            return forward(*args, **kwargs)
        finally:
            with count_lock:
                inside -= 1

    prompts = ["ROMEO:", "JULIET:", "KING:", "First Citizen:"]
    start, results = threading.Barrier(len(prompts)), {}

    def ask(prompt: str, streamed: bool) -> None:
        body = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
        start.wait(timeout=10)  # all requests at once
        _, _, answer = request(f"{server}/v1/completions", {**body, "stream": streamed})
        if streamed:
            chunks = [json.loads(e) for e in events(answer)[:-1]]  # then [DONE]
            results[prompt] = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            results[prompt] = json.loads(answer)["choices"][0]["text"]

    model.forward = counted_forward  # the server holds this very model
    try:
        threads = [threading.Thread(target=ask, args=(p, i % 2 == 1))
                   for i, p in enumerate(prompts)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        del model.forward
    assert calls >= len(prompts) and most == 1, f"{most} forward passes at once"
    # continuous batching: the requests shared passes (alone: 20 passes each)
    assert calls < len(prompts) * 20, calls
    for prompt in prompts:
        assert results[prompt] == complete(model, tokenizer, prompt, 20, temperature=0)


class Broken(nn.Module):
    """A model whose forward pass fails: generation raises inside the server."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise RuntimeError("the model broke")


def test_server_survives_an_error_in_generation(course):
    model, tokenizer = course
    httpd = make_server(Broken(model.config), tokenizer, "base", "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = "http://{}:{}".format(*httpd.server_address[:2])
    try:
        for _ in range(2):
            status, _, text = request(f"{url}/v1/completions", {"prompt": "a"})
            assert status == 500
            error = json.loads(text)["error"]
            assert error["type"] == "server_error" and "broke" in error["message"]
        body = {"prompt": "a", "stream": True}
        status, _, text = request(f"{url}/v1/completions", body)
        assert status == 200  # the stream had begun: the error is its last event
        assert "broke" in json.loads(events(text)[-1])["error"]["message"]
        assert request(f"{url}/health")[0] == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_serve_command_line(course):
    model, tokenizer = course
    command = [sys.executable, "-m", "shared.serve", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True
    )
    try:
        lines: list[str] = []  # the first line says where it listens
        reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()))
        reader.start()
        reader.join(timeout=90)
        assert lines and "serving base on http://" in lines[0], lines
        url = lines[0].split(" on ")[1].split()[0]
        assert request(f"{url}/health")[0] == 200
        body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}
        status, _, text = request(f"{url}/v1/completions", body)
        assert status == 200
        expected = complete(model, tokenizer, "ROMEO:", 20, temperature=0)
        assert json.loads(text)["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    "field, flag, value",
    [
        ("temperature", "--temperature", -1),
        ("top_p", "--top-p", 0),
        ("top_p", "--top-p", 1.5),
        ("top_k", "--top-k", 0),
        ("seed", "--seed", 2**64),
        ("stop", "--stop", ""),
    ],
)
def test_server_and_command_line_refuse_with_one_check(field, flag, value, capsys):
    # one validation of sampling settings: the same value is refused by both, with
    # the same message, and the server names the field it refused
    from shared.generation import SettingError, check_settings
    from shared.openai_api import APIError, parse_request

    settings = {"max_new_tokens": 16, field: [value] if field == "stop" else value}
    with pytest.raises(SettingError) as direct:
        check_settings(**settings)
    with pytest.raises(APIError) as served:
        parse_request({"prompt": "x", field: value}, "base")
    assert served.value.status == 400 and served.value.param == field
    assert served.value.message == str(direct.value)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "base", flag, str(value)])
    assert exit_.value.code == 2
    assert str(direct.value) in capsys.readouterr().err


# ------------------------------------------------------------ chat completions

QUESTION = "How many words are there?\nmy kingdom for a horse"  # the README's


@pytest.fixture(scope="module")
def chat_model():
    model, tokenizer, _ = load_course_model("cpu", name="sft")
    return model, tokenizer


@pytest.fixture(scope="module")
def chat_server(chat_model):
    httpd = make_server(*chat_model, "sft", "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield "http://{}:{}".format(*httpd.server_address[:2])
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def solo_answer(model, tokenizer, messages: list[dict], n: int, **kw) -> list[int]:
    """The answer's ids from ``generate`` alone, up to and with ``<|end|>``."""
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
    end = stop_id(tokenizer)
    out = generate(model, torch.tensor([ids]), n, eos_id=end, **kw)[0, len(ids) :]
    out = out.tolist()
    return out[: out.index(end) + 1] if end in out else out


def test_chat_completion_answers_as_generate(chat_model, chat_server):
    model, tokenizer = chat_model
    messages = [{"role": "user", "content": QUESTION}]
    body = {"model": "sft", "messages": messages, "temperature": 0}
    status, _, text = request(f"{chat_server}/v1/chat/completions", body)
    assert status == 200, text
    answer = json.loads(text)
    assert answer["object"] == "chat.completion" and answer["model"] == "sft"
    assert answer["id"].startswith("chatcmpl-") and isinstance(answer["created"], int)
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "five"}
    ids = solo_answer(model, tokenizer, messages, 16, temperature=0)
    assert tokenizer.decode(ids[:-1]) == "five"
    prompt = len(encode_chat(tokenizer, messages, add_generation_prompt=True)[0])
    assert answer["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": len(ids),  # <|end|> included, as <|endoftext|> is
        "total_tokens": prompt + len(ids),
    }
    # OpenAI's content as a list of text parts
    parts = [{"type": "text", "text": t} for t in QUESTION.partition("\n")]
    body["messages"] = [{"role": "user", "content": parts}]
    answer = json.loads(request(f"{chat_server}/v1/chat/completions", body)[2])
    assert answer["choices"][0]["message"]["content"] == "five"
    # a budget too short to end the turn: "length"
    answer = json.loads(request(f"{chat_server}/v1/chat/completions",
                                {**body, "max_tokens": 1})[2])  # fmt: skip
    assert answer["choices"][0]["finish_reason"] == "length"


def test_chat_stream_deltas_join_to_the_answer(chat_model, chat_server):
    model, tokenizer = chat_model
    messages = [
        {"role": "system", "content": "You are a player in Shakespeare's company."},
        {"role": "user", "content": "Write a line in the style of Shakespeare."},
    ]
    for extra in ({"temperature": 0}, {"seed": 7, "top_p": 0.9}):
        body = {"messages": messages, "max_tokens": 40, **extra}
        whole = json.loads(request(f"{chat_server}/v1/chat/completions", body)[2])
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        status, headers, text = request(f"{chat_server}/v1/chat/completions", body)
        assert status == 200 and headers["Content-Type"] == "text/event-stream"
        data = events(text)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks.pop()["usage"] == whole["usage"]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert len({c["id"] for c in chunks}) == 1
        first, *middle, last = [c["choices"][0] for c in chunks]
        assert first["delta"] == {"role": "assistant", "content": ""}
        assert last["delta"] == {} and last["finish_reason"] is not None
        assert all(c["finish_reason"] is None and c["delta"]["content"] for c in middle)
        content = "".join(c["delta"]["content"] for c in middle)
        assert content == whole["choices"][0]["message"]["content"]
        assert last["finish_reason"] == whole["choices"][0]["finish_reason"]
        kw = extra | {"generator": torch.Generator().manual_seed(extra.get("seed", 0))}
        kw.pop("seed", None)
        ids = solo_answer(model, tokenizer, messages, 40, **kw)
        assert content == tokenizer.decode([i for i in ids if i != stop_id(tokenizer)])


def test_the_openai_client_talks_to_the_server(chat_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat_server}/v1", api_key="none")
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(
        model="sft", messages=messages, temperature=0
    )
    assert answer.choices[0].message.content == "five"
    assert answer.choices[0].finish_reason == "stop"
    stream_ = client.chat.completions.create(
        model="sft", messages=messages, temperature=0, stream=True
    )
    chunks = list(stream_)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "five"
    assert [m.id for m in client.models.list().data] == ["sft"]
    with pytest.raises(openai.BadRequestError, match="roles are"):
        client.chat.completions.create(
            model="sft", messages=[{"role": "bot", "content": "hi"}]
        )
    text = client.completions.create(
        model="sft", prompt="ROMEO:", max_tokens=5, temperature=0
    )
    assert text.choices[0].finish_reason in ("stop", "length")


def test_command_line_chat_wraps_the_prompt_as_a_user_turn(chat_model, capsys):
    model, tokenizer = chat_model
    argv = ["--model", "sft", "--chat", "--temperature", "0", "--device", "cpu"]
    main([*argv, "--prompt", r"How many words are there?\nmy kingdom for a horse"])
    assert capsys.readouterr().out == "five\n"  # the answer only, cut at <|end|>
    question = "Write a line in the style of Shakespeare."
    main([*argv, "--prompt", question, "--max-new-tokens", "30", "--stream"])
    ids = solo_answer(model, tokenizer, [{"role": "user", "content": question}], 30,
                      temperature=0)  # fmt: skip
    answer = tokenizer.decode([i for i in ids if i != stop_id(tokenizer)])
    assert capsys.readouterr().out == answer + "\n"
    with pytest.raises(SystemExit):
        main(["--chat", "--prompt", "Hi"])  # the base model: no chat tokens
    assert "--chat needs a chat model" in capsys.readouterr().err


def readme_block(language: str, contains: str) -> str:
    """The README's first ``language`` code block that contains ``contains``."""
    readme = (REPO_ROOT / "README.md").read_text()
    for block in readme.split("```" + language + "\n")[1:]:
        code = block.split("```")[0]
        if contains in code:
            return code
    raise AssertionError(f"README has no {language} block with {contains!r}")


def test_the_readme_chat_examples_run(chat_server, capsys):
    code = readme_block("python", "OpenAI(")
    pytest.importorskip("openai")
    assert 'base_url="http://localhost:8000/v1"' in code
    exec(code.replace("http://localhost:8000", chat_server), {})
    assert capsys.readouterr().out == "five\nfive"  # the answer, then streamed
    curl = readme_block("bash", "/v1/chat/completions")
    line = next(c for c in curl.split("curl ") if "/v1/chat/completions" in c)
    body = json.loads(line.split("-d '")[1].split("'")[0])
    answer = json.loads(request(f"{chat_server}/v1/chat/completions", body)[2])
    assert answer["choices"][0]["message"]["content"] == "five"


def test_concurrent_chats_answer_as_alone(chat_model, chat_server):
    model, tokenizer = chat_model
    questions = [QUESTION, "Who is Romeo?", "Say something.", "Name a king."]
    results, start = {}, threading.Barrier(len(questions))

    def ask(q: str) -> None:
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": 30}
        start.wait(timeout=10)
        text = request(f"{chat_server}/v1/chat/completions", body | {"seed": 3})[2]
        results[q] = json.loads(text)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for q in questions:
        messages = [{"role": "user", "content": q}]
        g = torch.Generator().manual_seed(3)
        ids = solo_answer(model, tokenizer, messages, 30, generator=g)
        assert results[q] == tokenizer.decode(
            [i for i in ids if i != stop_id(tokenizer)]
        )
