"""The hostile-user probe of issue #22: nothing lost, every bad input a clear error.

The server runs in this process (``make_server(..., port=0)`` in a thread) and the
command lines through their ``main``: bursts of connections, extreme but valid
numbers, JSON nested 100,000 deep, every HTTP method, bad ports, and ``--model`` in
all its forms in all four commands. Each case asserts an answer (200, or a 4xx/5xx
JSON error naming the field) or a one-line error with exit code 2: never a reset
connection, a 500 or a traceback.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

import shared.evaluate
import shared.evaluation.report
import shared.serve
from shared import evaluate, export, generate, serve
from shared.checkpoint import save_checkpoint
from shared.generation import complete
from shared.hf_export import export_hf
from shared.model import GPT, GPTConfig
from shared.model_spec import find_model, load_model
from shared.pretrained import MODELS_DIR, load_course_model
from shared.server import make_server


@pytest.fixture(scope="module")
def course():
    model, tokenizer, info = load_course_model("cpu")
    return model, tokenizer, info


def serving(model, tokenizer, **kwargs):
    """A started server and its (host, port); ``stop(httpd, thread)`` ends it."""
    httpd = make_server(model, tokenizer, "base", "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


def stop(httpd, thread) -> None:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(course):
    httpd, thread = serving(*course[:2])
    yield httpd.server_address[:2]
    stop(httpd, thread)


def raw_request(address, data: bytes, timeout: float = 120) -> tuple:
    """Send ``data`` on a new connection; (status, headers, body) of the answer."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


def post(body: bytes | dict, path: str = "/v1/completions") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


def ask(address, method: str, path: str, body: bytes | dict | None = None):
    """(status, headers, body) of one request on a new connection."""
    if method == "POST":
        return raw_request(address, post(body or b"", path))
    line = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    return raw_request(address, line.encode())


def error_of(status: int, body: bytes) -> dict:
    """The OpenAI-style error object of an error response."""
    assert status >= 400, status
    return json.loads(body)["error"]


# ---------------------------------------------------------------- bursts


def burst(address, n: int, body: dict) -> list:
    """``n`` requests sent at once; each one's (status, headers, body), or the
    name of the exception that lost it (a reset, a timeout)."""
    start, results = threading.Barrier(n), [None] * n

    def one(i: int) -> None:
        start.wait(timeout=30)
        try:
            results[i] = raw_request(address, post(body))
        except OSError as err:
            results[i] = type(err).__name__

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def check_answered(results: list) -> dict[int, int]:
    """Every request got a 200 or a 503 with Retry-After; the count of each."""
    lost = [r for r in results if not isinstance(r, tuple)]
    assert not lost, f"{len(lost)} of {len(results)} requests lost: {lost}"
    counts: dict[int, int] = {}
    for status, headers, body in results:
        counts[status] = counts.get(status, 0) + 1
        if status == 503:
            assert int(headers["retry-after"]) >= 1
            error = error_of(status, body)
            assert error["type"] == "server_error" and "retry" in error["message"]
        else:
            assert status == 200, body
    return counts


def test_connections_wait_in_the_backlog_until_accepted(course):
    # the server listens but accepts nothing yet: with socketserver's backlog of 5
    # the kernel dropped the 7th connection on (reset or timed out, as in bursts)
    httpd = make_server(*course[:2], "base", "127.0.0.1", 0)
    address = httpd.server_address[:2]
    sockets, dropped = [], 0
    try:
        for _ in range(40):
            sock = socket.socket()
            sock.settimeout(1.0)
            try:
                sock.connect(address)
                sockets.append(sock)
            except OSError:
                dropped += 1
                sock.close()
        assert dropped == 0, f"{dropped} of 40 connections dropped"
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        for sock in sockets:  # now each is accepted and answered
            sock.settimeout(60)
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        httpd.shutdown()
        thread.join(timeout=10)
    finally:
        for sock in sockets:
            sock.close()
        httpd.server_close()


def test_a_burst_of_40_gets_40_answers(course, server):
    body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}
    counts = check_answered(burst(server, 40, body))
    assert counts.get(200, 0) >= 1, counts
    print(f"burst of 40: {counts}")


def test_a_full_queue_answers_503_with_retry_after(course):
    model, tokenizer, _ = course
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.05)  # each request holds the model for a while
        return forward(*args, **kwargs)

    httpd, thread = serving(model, tokenizer, max_waiting=2)
    model.forward = slow_forward
    try:
        body = {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
        counts = check_answered(burst(httpd.server_address[:2], 12, body))
    finally:
        del model.forward
        stop(httpd, thread)
    # one generating and two waiting at a time: the others were refused, not lost
    assert counts.get(503, 0) >= 1 and counts.get(200, 0) >= 3, counts


# ---------------------------------------------------------------- extreme values

BIG = "1" + "0" * 400  # 10**400 as JSON: a valid number no float can hold


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 1e-38},
        {"temperature": 1e-320},
        {"top_p": 1e-300},
        {"top_p": 5e-324, "temperature": 0.7},
    ],
)
def test_tiny_temperature_and_top_p_are_greedy(course, server, extra):
    model, tokenizer, _ = course
    body = {"prompt": "ROMEO:", "max_tokens": 12, "seed": 1, **extra}
    status, _, answer = ask(server, "POST", "/v1/completions", body)
    assert status == 200, answer
    greedy = complete(model, tokenizer, "ROMEO:", 12, temperature=0)
    assert json.loads(answer)["choices"][0]["text"] == greedy


@pytest.mark.parametrize(
    "field, raw, words",
    [
        ("max_tokens", BIG, "max_tokens must be 1 to 1024, got 1000"),
        ("temperature", BIG, "temperature must be finite"),
        ("temperature", "Infinity", "temperature must be finite"),
        ("temperature", "-" + BIG, "temperature must be >= 0"),
        ("temperature", "NaN", "temperature must be >= 0"),
        ("top_p", BIG, "top_p must be in (0, 1]"),
        ("top_p", "1e-400", "top_p must be in (0, 1]"),  # 0.0 as a float
        ("seed", BIG, "seed must fit in 64 bits"),
        ("top_k", "-" + BIG, "top_k must be >= 1"),
    ],
)
def test_extreme_numbers_are_a_400_naming_the_field(server, field, raw, words):
    data = b'{"prompt": "a", "%s": %s}' % (field.encode(), raw.encode())
    status, _, answer = ask(server, "POST", "/v1/completions", data)
    error = error_of(status, answer)
    assert status == 400 and error["param"] == field, error
    assert words in error["message"] and len(error["message"]) < 200


def test_a_huge_top_k_keeps_every_token(course, server):
    model, tokenizer, _ = course
    data = (
        b'{"prompt": "KING:", "max_tokens": 8, "seed": 4, "top_k": %s}' % BIG.encode()
    )
    status, _, answer = ask(server, "POST", "/v1/completions", data)
    assert status == 200, answer
    expected = complete(model, tokenizer, "KING:", 8, seed=4)
    assert json.loads(answer)["choices"][0]["text"] == expected


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [100_000, 5_000, 999, 990, 900, 500])
@pytest.mark.parametrize(
    "field", [None, "max_tokens", "stop", "stream", "logit_bias", "n", "typo"]
)
def test_deep_json_is_a_400_not_a_500(server, field, depth):
    if field is None:
        data = nested(depth)  # the body itself
    else:
        data = b'{"prompt": "a", "%s": %s}' % (field.encode(), nested(depth))
    status, _, answer = ask(server, "POST", "/v1/completions", data)
    error = error_of(status, answer)
    assert status == 400 and len(error["message"]) < 200, error
    assert error["type"] == "invalid_request_error"


def test_a_huge_field_name_is_not_echoed_back(server):
    name = "x" * 500_000
    status, _, answer = ask(server, "POST", "/v1/completions", {"prompt": "a", name: 1})
    error = error_of(status, answer)
    assert status == 400 and "unknown field 'xxx" in error["message"]
    assert len(answer) < 1000


# ---------------------------------------------------------------- methods


def test_head_answers_as_get_without_a_body(server):
    status, headers, body = ask(server, "HEAD", "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) > 0 and body == b""
    status, headers, body = ask(server, "HEAD", "/v1/completions")
    assert status == 405 and "POST" in headers["allow"] and body == b""


def test_options_lists_the_allowed_methods(server):
    status, headers, _ = ask(server, "OPTIONS", "/v1/completions")
    assert status == 204 and headers["allow"] == "POST, OPTIONS"
    status, headers, _ = ask(server, "OPTIONS", "/health")
    assert status == 204 and headers["allow"] == "GET, HEAD, OPTIONS"


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("PUT", "/v1/completions", 405),
        ("DELETE", "/health", 405),
        ("TRACE", "/health", 501),
        ("CONNECT", "/v1/completions", 501),
        ("PROPFIND", "/", 501),
        ("FOO", "/v1/models", 501),
    ],
)
def test_every_method_gets_a_json_error(server, method, path, status):
    got, headers, body = ask(server, method, path)
    assert got == status and headers["content-type"] == "application/json"
    error = error_of(got, body)
    if status == 405:
        assert "OPTIONS" in headers["allow"] and "takes" in error["message"]
    else:
        assert f"not {method}" in error["message"]


@pytest.mark.parametrize(
    "request_line, status",
    [
        (b"GET /health HTTP/2.0", 505),
        (b"GET /health HTTP/x", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1", 414),
    ],
)
def test_what_the_standard_library_refuses_is_json_too(server, request_line, status):
    got, headers, body = raw_request(server, request_line + b"\r\nHost: x\r\n\r\n")
    assert got == status and headers["content-type"] == "application/json"
    assert error_of(got, body)["message"]


# ---------------------------------------------------------------- command lines


def exit_2(capsys, main, argv) -> str:
    """The one-line error ``main(argv)`` exits with (code 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def generated(capsys, *args: str) -> str:
    argv = ["--prompt", "ROMEO:", "--max-new-tokens", "12", "--device", "cpu"]
    generate.main([*argv, *args])
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ("--temperature", "1e-40"),
        ("--temperature", "1e-320"),
        ("--top-p", "1e-300", "--seed", "2"),
    ],
)
def test_command_line_tiny_values_are_greedy(capsys, args):
    assert generated(capsys, *args) == generated(capsys, "--temperature", "0")


def test_infinite_temperature_is_refused_by_both_with_one_message(capsys, server):
    last = exit_2(capsys, generate.main, ["--temperature", "inf"])
    data = b'{"prompt": "a", "temperature": Infinity}'
    status, _, answer = ask(server, "POST", "/v1/completions", data)
    assert status == 400
    message = error_of(status, answer)["message"]
    assert last.endswith(message) and "temperature must be finite" in message


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_refuses_a_bad_port_before_loading(capsys, monkeypatch, port):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(shared.serve, "load_model", no_loading)
    last = exit_2(capsys, serve.main, ["--port", port])
    assert f"port must be 0 to 65535 (0: any free port), got {port}" in last


# ------------------------------------------------------------ --model everywhere


@pytest.fixture(scope="module")
def model_folders(course, tmp_path_factory):
    """One folder of each kind --model takes, besides the shipped ones."""
    model, tokenizer, info = course
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = GPT(GPTConfig(1024, 32, 2, 2, 32))  # the course BPE's vocabulary
    run = save_checkpoint(root / "run", small, None, step=7).parent
    return {
        "name": "sft",
        "adapter": "lora",
        "course folder": str(MODELS_DIR / "shakespeare-dpo"),
        "checkpoint run": str(run),
        "checkpoint step": str(run / "step-000007"),
        "hf export": str(export_hf(model, tokenizer, root / "hf-base", info)),
    }


KINDS = ["name", "adapter", "course folder", "checkpoint run", "checkpoint step"]
KINDS += ["hf export"]


@pytest.mark.parametrize("kind", KINDS)
def test_generate_and_serve_take_every_kind_of_model(
    model_folders, kind, capsys, monkeypatch
):
    spec = model_folders[kind]
    model, tokenizer, _ = load_model(spec, "cpu")
    text = complete(model, tokenizer, "ROMEO:", 12, temperature=0)
    assert generated(capsys, "--model", spec, "--temperature", "0") == (
        f"ROMEO:{text}\n"
    )
    served = {}

    class Stopped:
        server_address = ("127.0.0.1", 1)

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    def fake_server(model, tokenizer, name, *args):
        served.update(model=model, name=name)
        return Stopped()

    monkeypatch.setattr(shared.serve, "make_server", fake_server)
    serve.main(["--model", spec, "--device", "cpu"])
    assert served["name"] == find_model(spec).name
    assert "serving" in capsys.readouterr().err
    ids = torch.tensor([tokenizer.encode("ROMEO: O, she doth")])
    with torch.no_grad():
        torch.testing.assert_close(served["model"](ids), model(ids))


@pytest.mark.parametrize("kind", ["name", "checkpoint run", "adapter"])
def test_export_takes_every_kind_of_model(model_folders, kind, tmp_path, capsys):
    spec = model_folders[kind]
    out = export.main(["hf", str(tmp_path / "out"), "--model", spec])
    # the export loads back (as a --model itself) to the same logits
    model, tokenizer, _ = load_model(spec, "cpu")
    back, _, _ = load_model(str(out), "cpu")
    ids = torch.tensor([tokenizer.encode("KING RICHARD: Now is the winter")])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=1e-4, rtol=0)


def test_evaluate_takes_every_kind_of_model(model_folders, monkeypatch, capsys):
    seen = []

    def fake_evaluate(model, tokenizer, **kwargs):
        seen.append(model)
        return {"seconds": 0.0}

    monkeypatch.setattr(shared.evaluation.report, "evaluate_model", fake_evaluate)
    specs = [model_folders[k] for k in KINDS if k != "checkpoint step"]
    reports = evaluate.main(["--model", *specs])
    assert list(reports) == [find_model(s).name for s in specs]
    assert len(seen) == len(specs)


COMMANDS = {
    "generate": (generate.main, []),
    "serve": (serve.main, []),
    "evaluate": (evaluate.main, []),
    "export": (export.main, ["hf", "unused-out"]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_an_unknown_model_alike(command, capsys, tmp_path):
    main, before = COMMANDS[command]
    last = exit_2(capsys, main, [*before, "--model", "nosuch"])
    assert "unknown model 'nosuch': give base, sft, lora, dpo, a model folder" in last
    last = exit_2(capsys, main, [*before, "--model", str(tmp_path)])
    assert f"{tmp_path} holds no model" in last
    (tmp_path / "weights.bin").write_bytes(b"")
    last = exit_2(capsys, main, [*before, "--model", str(tmp_path / "weights.bin")])
    assert "is a file; --model takes a name or a folder" in last


def no_evaluation(*args, **kwargs):
    raise AssertionError("evaluation began before every argument was checked")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "base", "nosuch"], "unknown model 'nosuch': give base, sft"),
        (["--model", "base", "--json", "/no/such/folder/r.json"], "missing or read"),
        (["--model", "base", "--json", "."], "is a folder"),
        (["--model", str(MODELS_DIR / "shakespeare-sft"), "runs/no/such"],
         "unknown model 'runs/no/such'"),
    ],
)  # fmt: skip
def test_evaluate_checks_everything_before_any_work(argv, words, monkeypatch, capsys):
    monkeypatch.setattr(shared.evaluation.report, "evaluate_model", no_evaluation)
    started = time.perf_counter()
    assert words in exit_2(capsys, evaluate.main, argv)
    assert time.perf_counter() - started < 60  # not minutes on "base" first


def test_evaluate_refuses_two_models_of_one_name(model_folders, monkeypatch, capsys):
    monkeypatch.setattr(shared.evaluation.report, "evaluate_model", no_evaluation)
    run = model_folders["checkpoint run"]
    last = exit_2(capsys, evaluate.main, ["--model", run, f"{run}/."])
    assert "two models are named 'run'" in last


def test_a_checkpoint_of_another_tokenizer_is_a_clear_error(tmp_path, capsys):
    char_level = GPT(GPTConfig(65, 16, 1, 1, 16))
    save_checkpoint(tmp_path, char_level, None, step=1)
    last = exit_2(capsys, generate.main, ["--model", str(tmp_path)])
    assert "65 ids, not one of the course BPE" in last
