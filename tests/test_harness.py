"""lm-evaluation-harness on the course's tasks gives the course's own numbers: through
the Hugging Face export, and through ``CourseLM`` without one."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from shared.evaluation import (
    MC_TASKS,
    MCItem,
    MCResult,
    load_mc_items,
    loglikelihood,
    mc_requests,
    score_mc,
    split_request,
)
from shared.evaluation.harness import (
    compare,
    run_lm_eval,
    write_generation_task,
    write_task,
)
from shared.hf_export import export_hf
from shared.pretrained import load_course_model

N = 20  # items per task: enough to disagree somewhere, fast on two cores
ROMEO = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
PLANTED = [  # the edge cases of lm-eval's request convention, one item each
    MCItem(  # trailing space: it moves to the start of every continuation
        "planted-0", "planted", "ROMEO:\nBut, soft! what light through yonder ",
        ["window breaks?", "door speaks?", "casement, ho!"], 0,
    ),
    MCItem(  # mixed trailing whitespace, moved as a whole
        "planted-1", "planted", "JULIET:\nO Romeo, Romeo! \n\t",
        ["wherefore art thou Romeo?", "Deny thy father"], 0,
    ),
    MCItem(  # empty context: the continuation follows <|endoftext|>
        "planted-2", "planted", "", ["ROMEO:\n", "First Citizen:\n"], 1
    ),
    MCItem(  # longer than the window: the context is cut from the left
        "planted-3", "planted", ROMEO * 12, [ROMEO, "JULIET:\nAy me!\n"], 0
    ),
]  # fmt: skip
TASKS = [*MC_TASKS, "planted"]


@pytest.fixture(scope="module")
def course():
    model, tokenizer, _ = load_course_model("cpu", name="base")
    return model, tokenizer


@pytest.fixture(scope="module")
def items() -> dict[str, list[MCItem]]:
    return {task: load_mc_items(task) for task in MC_TASKS} | {"planted": PLANTED}


@pytest.fixture(scope="module")
def tasks_dir(items, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    for task, task_items in items.items():
        assert write_task(task_items, folder, task) == folder
    return folder


@pytest.fixture(scope="module")
def hf_dir(course, tmp_path_factory):
    return export_hf(*course, tmp_path_factory.mktemp("export") / "base")


@pytest.fixture(scope="module")
def hf_run(hf_dir, tasks_dir):
    return run_lm_eval(hf_dir, tasks_dir, TASKS, limit=N)


@pytest.fixture(scope="module")
def course_lm(course):
    from shared.evaluation.harness import CourseLM

    return CourseLM(*course)


@pytest.fixture(scope="module")
def course_run(course_lm, tasks_dir):
    return run_lm_eval(course_lm, tasks_dir, TASKS, limit=N)


@pytest.fixture(scope="module")
def scores(course, items):
    return {
        task: score_mc(*course, task_items[:N]) for task, task_items in items.items()
    }


def test_write_task_round_trips_the_items(items, tasks_dir):
    import yaml

    for task in MC_TASKS:
        assert load_mc_items(task, tasks_dir) == items[task]
    lines = (tasks_dir / "planted.jsonl").read_text(encoding="utf-8").splitlines()
    assert [MCItem(**json.loads(line)) for line in lines] == PLANTED
    config = yaml.safe_load((tasks_dir / "planted.yaml").read_text())
    assert config["task"] == "planted" and config["target_delimiter"] == ""
    assert config["dataset_kwargs"]["data_files"]["test"] == str(
        tasks_dir / "planted.jsonl"
    )


@pytest.mark.parametrize("task", TASKS)
def test_lm_eval_on_the_export_agrees_with_score_mc_item_by_item(
    task, items, hf_run, scores
):
    result = hf_run[task]
    n = min(N, len(items[task]))
    expected = [(it.id, it.label) for it in items[task][:n]]  # the file's order
    assert [(it["id"], it["label"]) for it in result["items"]] == expected
    diff = compare(scores[task], result)
    assert diff["items"] == n
    assert diff["pred_differs"] == 0 and diff["pred_norm_differs"] == 0
    assert diff["max_abs_ll_diff"] < 1e-3, diff
    assert diff["acc_matches"] and diff["acc_norm_matches"]
    # lm-eval's standard error: sample standard deviation (n - 1) / sqrt(n)
    correct = scores[task].correct()
    assert result["acc"] == pytest.approx(correct.mean(), abs=1e-12)
    assert result["acc_stderr"] == pytest.approx(correct.std(ddof=1) / np.sqrt(n))


def test_planted_items_are_the_course_loglikelihood_requests(course, hf_run):
    model, tokenizer = course
    ours = loglikelihood(model, tokenizer, mc_requests(PLANTED))
    theirs = [
        (ll, greedy)
        for item in hf_run["planted"]["items"]
        for ll, greedy in zip(item["loglikelihoods"], item["greedy"], strict=True)
    ]
    assert [g for _, g in ours] == [g for _, g in theirs]
    diff = max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs, strict=True))
    assert diff < 1e-3
    # the items do exercise the conventions: whitespace moved, window overflowed
    for item in PLANTED[:2]:
        moved, _ = split_request(tokenizer, item.context, item.choices[0])
        assert moved != tokenizer.encode(item.context, disallowed_special=())
    assert len(tokenizer.encode(PLANTED[3].context)) > model.config.context_length


def test_course_lm_gives_the_numbers_of_the_export(hf_run, course_run):
    for task in TASKS:
        ours, theirs = course_run[task], hf_run[task]
        assert ours["acc"] == theirs["acc"] and ours["acc_norm"] == theirs["acc_norm"]
        for a, b in zip(ours["items"], theirs["items"], strict=True):
            assert a["id"] == b["id"] and a["pred"] == b["pred"]
            assert a["pred_norm"] == b["pred_norm"] and a["greedy"] == b["greedy"]
            assert np.allclose(a["loglikelihoods"], b["loglikelihoods"], atol=1e-4)


def test_compare_refuses_items_the_course_did_not_score(scores, hf_run):
    full = scores["next_line"]
    part = MCResult(full.items[:5], full.loglikelihoods[:5], full.greedy[:5])
    with pytest.raises(ValueError, match="did not"):
        compare(part, hf_run["next_line"])


def test_rolling_and_generation_match_lm_evals_hf_model(course, hf_dir, course_lm):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = course
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=1)

    def requests(kind, args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    texts = ["ROMEO:", ROMEO, ROMEO * 6, ROMEO * 16]  # 1, 1, 2 and 4 windows
    assert len(tokenizer.encode(texts[-1])) > 3 * model.config.context_length
    rolling = requests("loglikelihood_rolling", [(t,) for t in texts])
    ours, theirs = (
        course_lm.loglikelihood_rolling(rolling),
        hf.loglikelihood_rolling(rolling),
    )
    assert np.allclose(ours, theirs, atol=1e-3, rtol=0), (ours, theirs)
    # within one window the rolling score is the whole text after <|endoftext|>
    (whole, _), (one_window, _) = loglikelihood(model, tokenizer, [("", ROMEO)] * 2)
    assert ours[1] == pytest.approx(whole, abs=1e-4) == one_window

    gen = {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False}
    prompts = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nWe are"]
    generating = requests("generate_until", [(p, gen) for p in prompts])
    ours = course_lm.generate_until(generating)
    assert ours == hf.generate_until(generating)
    # an empty prompt starts a new text (lm-eval's HF model fails on one)
    ours += course_lm.generate_until(requests("generate_until", [("", gen)]))
    assert not any("\n\n" in text for text in ours) and ours[-1]


def test_run_lm_eval_keeps_the_callers_random_state(course_lm, tasks_dir):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    run_lm_eval(course_lm, tasks_dir, ["planted"], limit=1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_importing_the_module_does_not_import_lm_eval():
    code = "import sys, shared.evaluation.harness; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_request_reads_endoftext_as_the_special_token(course, hf_dir, course_lm):
    # before: loglikelihood read "<|endoftext|>" as the special token, the rolling
    # score and generate_until as 13 plain characters (-186.3 vs -77.8 on one text)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = course
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=1)
    text = "ROMEO:\nGood night.\n<|endoftext|>JULIET:\nGood night, good night!\n"
    eot = tokenizer.special_tokens["<|endoftext|>"]
    assert eot in tokenizer.encode(text, allowed_special="all")
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ours = course_lm.loglikelihood_rolling(rolling)[0]
    ((whole, _),) = loglikelihood(model, tokenizer, [("", text)])
    assert ours == pytest.approx(whole, abs=1e-4)
    assert ours == pytest.approx(hf.loglikelihood_rolling(rolling)[0], abs=1e-3)

    gen = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    prompt = [
        Instance("generate_until", {}, ("Farewell.\n<|endoftext|>KING:\n", gen), 0)
    ]
    assert course_lm.generate_until(prompt) == hf.generate_until(prompt)


# ------------------------------------------------------------ generation tasks


@pytest.fixture(scope="module")
def sft_course():
    model, tokenizer, _ = load_course_model("cpu", name="sft")
    return model, tokenizer


@pytest.fixture(scope="module")
def instructions():
    from shared.tasks import load_examples

    return load_examples("test")[::25]  # 20 examples, every task


@pytest.fixture(scope="module")
def generation_dir(sft_course, instructions, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation")
    return write_generation_task(instructions, sft_course[1], folder, "instructions")


def test_generation_task_is_chapter_07s_prompt_and_stop(
    sft_course, course, instructions, generation_dir
):
    import yaml

    from shared.chat import prompt_ids
    from shared.evaluation import encode_text
    from shared.evaluation.harness import instruction_prompt

    _, tokenizer = sft_course
    config = yaml.safe_load((generation_dir / "instructions.yaml").read_text())
    assert config["output_type"] == "generate_until"
    assert config["generation_kwargs"]["until"] == ["<|end|>"]
    assert config["fewshot_delimiter"] == "<|end|>"
    assert config["target_delimiter"] == ""
    budget = max(len(tokenizer.encode(e.output)) for e in instructions) + 1 + 4
    assert config["generation_kwargs"]["max_gen_toks"] == budget
    rows = [
        json.loads(line)
        for line in (generation_dir / "instructions.jsonl").read_text().splitlines()
    ]
    assert [r["output"] for r in rows] == [e.output for e in instructions]
    for row, e in zip(rows, instructions, strict=True):
        # the harness reads text: its ids are the ids chapter 07 generates from
        ids = encode_text(tokenizer, row["prompt"])
        assert ids == prompt_ids(tokenizer, e.instruction, e.input)
    # a tokenizer without the chat tokens gets the text template and <|endoftext|>
    base_tokenizer = course[1]
    assert instruction_prompt(base_tokenizer, instructions[0]).endswith(
        "### Response:\n"
    )
    folder = write_generation_task(
        instructions, base_tokenizer, generation_dir / "text", "plain"
    )
    plain = yaml.safe_load((folder / "plain.yaml").read_text())
    assert plain["generation_kwargs"]["until"] == ["<|endoftext|>"]


def test_generate_until_gives_chapter_07s_exact_match(
    sft_course, instructions, generation_dir
):
    from shared.evaluation import task_accuracy
    from shared.evaluation.harness import CourseLM, compare_answers

    model, tokenizer = sft_course
    acc, responses = task_accuracy(model, tokenizer, instructions)
    run = run_lm_eval(CourseLM(model, tokenizer), generation_dir, ["instructions"])
    result = run["instructions"]
    diff = compare_answers(instructions, responses, result)
    assert diff["items"] == len(instructions)
    assert diff["response_differs"] == [] and diff["verdict_differs"] == []
    assert (
        result["exact_match"]
        == pytest.approx(acc["all"])
        == diff["harness_exact_match"]
    )
    assert 0 < acc["all"] < 1  # some right, some wrong: the comparison can fail
    assert [it["response"] for it in result["items"]] == [r.strip() for r in responses]
    # a verdict that differs is found: flip one wrong item to right
    k = next(i for i, it in enumerate(result["items"]) if not it["exact_match"])
    flipped = [dict(it, exact_match=i == k or it["exact_match"])
               for i, it in enumerate(result["items"])]  # fmt: skip
    changed = compare_answers(instructions, responses, dict(result, items=flipped))
    assert changed["verdict_differs"] == [str(k)]


def test_few_shot_prompts_are_solved_items_before_the_item(
    sft_course, instructions, generation_dir, caplog
):
    from shared.evaluation.harness import CourseLM

    lm = CourseLM(*sft_course)
    zero = run_lm_eval(lm, generation_dir, ["instructions"], limit=5)["instructions"]
    two = run_lm_eval(lm, generation_dir, ["instructions"], limit=5, num_fewshot=2)
    # the shots were asked for: lm-eval's warning that they override the task's
    # default is not passed on
    assert "num_fewshot" not in caplog.text
    solved = {
        row["prompt"] + row["output"] + "<|end|>"
        for row in map(
            json.loads,
            (generation_dir / "instructions.jsonl").read_text().splitlines(),
        )
    }
    for z, t in zip(zero["items"], two["instructions"]["items"], strict=True):
        own = z["prompt"]
        assert t["prompt"].endswith(own) and t["prompt"] != own
        shots = t["prompt"][: -len(own)].split("<|end|><|user|>")
        shots = [shots[0]] + ["<|user|>" + s for s in shots[1:]]
        shots = [s if s.endswith("<|end|>") else s + "<|end|>" for s in shots]
        assert len(shots) == 2 and all(s in solved for s in shots)
        assert not any(s.startswith(own) for s in shots)  # never the item itself
