"""``python -m shared.generate``: continue a prompt with a course model and print it
(the generation itself is ``shared.generation``).

    python -m shared.generate --prompt "ROMEO:\\n" --max-new-tokens 100 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared.generation import check_settings, complete, stream, unescape
from shared.model_spec import MODEL_HELP, load_model


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print the prompt and a model's continuation of it."""
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
    parser.add_argument("--model", default="base", help=f"{MODEL_HELP} (default base)")
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
        model, tokenizer, _ = load_model(args.model, args.device)
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
