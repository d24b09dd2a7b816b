"""``python -m shared.serve``: serve a course model with an OpenAI-style API
(completions, and chat completions for the chat models ``sft`` and ``dpo``) until
Ctrl+C; the server itself is ``shared.server``.

    python -m shared.serve --model sft --port 8000 --max-batch 8
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared.model_spec import MODEL_HELP, find_model, load_model
from shared.server import MAX_BATCH, MAX_WAITING, check_port, make_server


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve a course model until Ctrl+C."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.serve",
        description="Serve a course model with an OpenAI-style API: "
        "/v1/completions, and /v1/chat/completions for a chat model (sft, dpo).",
    )
    parser.add_argument("--model", default="base", help=f"{MODEL_HELP} (default base)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best one)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        help=f"requests decoded together (continuous batching; default {MAX_BATCH})",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    try:  # the port first: a bad one is refused before the model loads
        check_port(args.port)
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
        found = find_model(args.model)
        model, tokenizer, _ = load_model(found, args.device)
    except Exception as err:  # a missing or damaged model folder, a bad device
        parser.error(" ".join(str(err).split()))
    name = found.name  # "base", or a model folder's name
    try:
        server = make_server(
            model, tokenizer, name, args.host, args.port, args.verbose,
            MAX_WAITING, args.max_batch,
        )  # fmt: skip
    except OSError as err:  # the port is taken, the host is not this machine's
        parser.error(f"cannot listen on {args.host}:{args.port}: {err}")
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port} (Ctrl+C stops)", file=sys.stderr)
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
