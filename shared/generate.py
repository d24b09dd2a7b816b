"""``python -m shared.generate``: continue a prompt with a course model and print it
(the generation itself is ``shared.generation``).

    python -m shared.generate --prompt "ROMEO:\\n" --max-new-tokens 100 --seed 1
    python -m shared.generate --model sft --chat --temperature 0 \\
        --prompt "How many words are there?\\nmy kingdom for a horse"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared.chat import END, format_chat, has_chat_tokens
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
    parser.add_argument(
        "--chat",
        action="store_true",
        help="--prompt is a user message in chapter 7's chat format (models sft, "
        "dpo): print only the answer, which ends at <|end|>",
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
        if args.chat and not has_chat_tokens(tokenizer):
            raise ValueError(
                f"--chat needs a chat model (sft, dpo): {args.model} has no chat tokens"
            )
    except Exception as err:  # a missing or damaged model folder, a bad device
        parser.error(" ".join(str(err).split()))  # one line, exit code 2
    prompt, shown = args.prompt, args.prompt  # shown: printed before the text
    if args.chat:  # the markers are special tokens: complete() allows them
        user = [{"role": "user", "content": args.prompt}]
        prompt, shown = format_chat(user, add_generation_prompt=True), ""
        settings["stop"] = [*args.stop, END]
    try:
        if args.stream:
            print(shown, end="", flush=True)
            for piece in stream(model, tokenizer, prompt, **settings):
                print(piece, end="", flush=True)
            print()
        else:
            print(shown + complete(model, tokenizer, prompt, **settings))
    except KeyboardInterrupt:
        print()
        sys.exit(130)


if __name__ == "__main__":
    main()
