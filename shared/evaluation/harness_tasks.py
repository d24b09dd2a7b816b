"""The course's tasks as lm-evaluation-harness task folders (JSON lines + YAML):
multiple choice (``write_task``) and chapter 07's instructions as a generation task
scored by exact match (``write_generation_task``). ``shared.evaluation.harness`` runs
them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from shared import chat, sft
from shared.evaluation.multiple_choice import MCItem
from shared.tasks import Example

# lm-eval's YAML for a course task: the context is the prompt as it stands and each
# choice is appended to it as it stands (target_delimiter ""): contexts already end in
# "\n", and lm-eval's default delimiter " " would change every continuation.
# cache_dir keeps datasets' Arrow cache beside the task, not in the home folder.
# fewshot_split names the test split as the source of few-shot examples: without it
# lm-eval 0.4 draws them from the test items as well but does not leave out the item
# being asked, which may then show its own answer.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(items: Sequence[MCItem], folder: str | Path, name: str) -> Path:
    """Write ``{folder}/{name}.jsonl`` and the task's ``{folder}/{name}.yaml``."""
    folder = Path(folder).resolve()  # datasets reads data_files relative to the cwd
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(dataclasses.asdict(item), ensure_ascii=False) for item in items]
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    # json.dumps quotes the paths: a JSON string is a valid YAML scalar
    yaml = TASK_YAML.format(
        name=name, data=json.dumps(str(data)), cache=json.dumps(str(folder / ".cache"))
    )
    (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return folder


# A generation task: lm-eval continues each prompt greedily up to the end marker and
# compares the response, stripped of surrounding whitespace (the "strip" filter), with
# the answer: chapter 07's ``check_answer``. Few-shot examples are whole solved turns
# (prompt, answer, end marker), so k shots read as k earlier exchanges.
GENERATION_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{output}}}}"
target_delimiter: ""
fewshot_delimiter: {end}
generation_kwargs:
  until: [{end}]
  max_gen_toks: {max_gen_toks}
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def instruction_prompt(tokenizer, example: Example) -> str:
    """The text a model continues to answer ``example``: the chat generation prompt
    for a tokenizer with the chat tokens, else the text template (its ids are
    ``shared.chat.prompt_ids``)."""
    if chat.has_chat_tokens(tokenizer):
        messages = chat.instruction_messages(example.instruction, example.input)
        return chat.format_chat(messages, add_generation_prompt=True)
    return sft.format_prompt(example.instruction, example.input)


def write_generation_task(
    examples: Sequence[Example],
    tokenizer,
    folder: str | Path,
    name: str,
    max_gen_toks: int | None = None,
    slack: int = 4,
) -> Path:
    """Write ``examples`` as a ``generate_until`` task in ``tokenizer``'s format.

    The task stops at the format's end marker (``<|end|>`` or ``<|endoftext|>``) and
    scores exact match after stripping whitespace. ``max_gen_toks`` defaults to the
    largest budget ``task_accuracy`` gives an example: its answer's tokens, the end
    marker and ``slack``.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    end = chat.END if chat.has_chat_tokens(tokenizer) else "<|endoftext|>"
    if max_gen_toks is None:
        max_gen_toks = max(len(tokenizer.encode(e.output)) for e in examples)
        max_gen_toks += 1 + slack
    rows = [
        json.dumps(
            {"id": str(k), "task": e.task, "prompt": instruction_prompt(tokenizer, e),
             "output": e.output},
            ensure_ascii=False,
        )
        for k, e in enumerate(examples)
    ]  # fmt: skip
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    yaml = GENERATION_YAML.format(
        name=name, data=json.dumps(str(data)), cache=json.dumps(str(folder / ".cache")),
        end=json.dumps(end), max_gen_toks=int(max_gen_toks),
    )  # fmt: skip
    (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return folder
