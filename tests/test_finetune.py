"""Chapter 07's pieces: the datasets, loss masking, LoRA, DPO and batched answers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from shared import chat, dpo, lora, sft, tasks
from shared.data import REPO_ROOT as REPO
from shared.evaluation import answers, response_loss, task_accuracy
from shared.generation import generate
from shared.model import GPT, GPTConfig
from shared.pretrained import MODELS_DIR, load_course_model


@pytest.fixture(scope="module")
def course():
    model, tokenizer, _ = load_course_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1024, context_length=128, n_layer=2, n_head=2,
                         n_embd=32)).eval()  # fmt: skip


# --- the datasets


def test_committed_datasets_are_what_the_script_makes():
    script = REPO / "chapters" / "07_finetuning_dpo" / "make_datasets.py"
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_splits_share_no_source_line():
    lines = {}
    for split in ("train", "test"):
        rows = tasks.load_examples(split) + tasks.load_pairs(split)
        lines[split] = {r.source for r in rows}
        assert rows and all(tasks.is_held_out(_line(r.source)) == (split == "test")
                            for r in rows)  # fmt: skip
    assert not lines["train"] & lines["test"]


_LINES: list = []


def _line(i: int) -> str:
    if not _LINES:
        from shared.data import read_text

        _LINES.extend(tasks.speech_lines(read_text("tinyshakespeare")))
    return _LINES[i][1]


def test_every_answer_checks_and_every_rejection_fails():
    for ex in tasks.load_examples("test"):
        assert tasks.check_answer(ex, ex.output)
    pairs = tasks.load_pairs("test")
    kinds = {p.kind for p in pairs}
    assert kinds == {"speaker", "repeat", "reverse", "count", "early_modern",
                     "off_format"}  # fmt: skip
    for p in pairs:
        ex = tasks.Example(p.task, p.instruction, p.input, p.chosen, p.source)
        assert tasks.check_answer(ex, p.chosen) and not tasks.check_answer(
            ex, p.rejected
        )


def test_task_answers_are_right():
    for ex in tasks.load_examples("train")[:400]:
        words = ex.input.split()
        if ex.task == "reverse":
            assert ex.output.split() == words[::-1]
        elif ex.task == "repeat":
            assert ex.output == ex.input
        elif ex.task == "count":
            assert tasks.NUMBERS.index(ex.output) == len(words)
        elif ex.task == "early_modern":
            assert tasks.to_early_modern(ex.input) == ex.output != ex.input
        else:
            assert ex.output in tasks.SPEAKERS


def test_lexicon_round_trip():
    assert tasks.to_early_modern("You are late, and your horse does limp.") == (
        "Thou art late, and thy horse doth limp."
    )
    assert tasks.to_modern("Thou art late") == "You are late"


# --- SFT: template, masking, padding


def test_prompt_and_response_encode_as_one_text(course):
    _, tok = course
    for ex in tasks.load_examples("test"):
        prompt = sft.format_prompt(ex.instruction, ex.input)
        ids, _ = sft.encode_example(tok, prompt, ex.output)
        assert ids[:-1] == tok.encode(prompt + ex.output)


def test_loss_masking_ignores_exactly_prompt_and_padding(course):
    _, tok = course
    examples = tasks.load_examples("test")[:5]
    encoded = sft.encode_examples(tok, examples)
    batch = sft.collate(encoded, sft.eos_id(tok), 128)
    for row, ex in enumerate(examples):
        prompt = tok.encode(sft.format_prompt(ex.instruction, ex.input))
        response = tok.encode(ex.output) + [sft.eos_id(tok)]
        labelled = (batch["targets"][row] != sft.IGNORE).nonzero()[:, 0].tolist()
        # target t is token t+1: the response starts at position len(prompt)
        assert labelled == list(range(len(prompt) - 1, len(prompt) - 1 + len(response)))
        assert batch["targets"][row, labelled].tolist() == response
        n = len(prompt) + len(response) - 1
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["input_ids"].size(1) - n
        )
    unmasked = sft.collate(sft.encode_examples(tok, examples, mask_prompt=False),
                           sft.eos_id(tok), 128)  # fmt: skip
    assert torch.equal(unmasked["targets"] != sft.IGNORE, batch["attention_mask"] == 1)


def test_masked_loss_equals_hand_computed_cross_entropy(course):
    model, tok = course
    encoded = sft.encode_examples(tok, tasks.load_examples("test")[:4])
    batch = sft.collate(encoded, sft.eos_id(tok), 128)
    with torch.no_grad():
        loss = sft.sft_loss(model, batch)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["targets"] != sft.IGNORE
    logp = torch.log_softmax(logits, -1)[keep]
    by_hand = -logp.gather(-1, batch["targets"][keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand)


def test_padding_does_not_change_a_row(course):
    model, tok = course
    encoded = sft.encode_examples(tok, tasks.load_examples("test")[:6])
    batch = sft.collate(encoded, sft.eos_id(tok), 128)
    with torch.no_grad():
        together = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        for row, (ids, _) in enumerate(encoded):
            alone = model(torch.tensor([ids[:-1]]))
            torch.testing.assert_close(together[row, : len(ids) - 1], alone[0],
                                       atol=1e-5, rtol=0)  # fmt: skip


def test_collate_refuses_too_long():
    with pytest.raises(ValueError, match="tokens"):
        sft.collate([(list(range(200)), list(range(200)))], 0, 128)


def test_left_padded_answers_equal_one_by_one(course):
    model, tok = course
    prompts = [sft.format_prompt(e.instruction, e.input)
               for e in tasks.load_examples("test")[:6]]  # fmt: skip
    together = answers(model, tok, prompts, 8)
    for prompt, answer in zip(prompts, together, strict=True):
        idx = torch.tensor([tok.encode(prompt)])
        out = generate(model, idx, 8, temperature=0.0, eos_id=sft.eos_id(tok))
        ids = out[0, idx.size(1) :].tolist()
        ids = ids[: ids.index(sft.eos_id(tok))] if sft.eos_id(tok) in ids else ids
        assert answer == tok.decode(ids)


# --- LoRA


def test_lora_zero_b_leaves_outputs_unchanged(tiny):
    idx = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    before = tiny(idx)
    model = lora.apply_lora(_copy(tiny), r=4, alpha=8)
    torch.testing.assert_close(model(idx), before, atol=0, rtol=0)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_lora_trains_only_adapters_and_merges_exactly(tiny):
    model = lora.apply_lora(_copy(tiny), r=4, alpha=8, targets=("c_attn", "c_proj"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
    # 2 layers x (c_attn 32->96, attn.c_proj 32->32, mlp.c_proj 128->32), rank 4
    expected = 2 * 4 * ((32 + 96) + (32 + 32) + (128 + 32))
    assert lora.trainable_parameters(model) == expected
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    idx = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(idx)
        assert (adapted - tiny(idx)).abs().max() > 1e-3  # the adapter does something
        merged = lora.merge_lora(model)
        assert not lora.lora_layers(merged)
        torch.testing.assert_close(merged(idx), adapted, atol=1e-5, rtol=0)


def test_lora_gradient_reaches_a_and_b(tiny):
    model = lora.apply_lora(_copy(tiny), r=2, alpha=2)
    idx = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(3))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.lora_B.grad.abs().sum() > 0  # B=0, so only B moves first
    assert layer.base.weight.grad is None


def test_peft_format_round_trip(tiny, tmp_path):
    model = lora.apply_lora(_copy(tiny), r=4, alpha=8)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    lora.save_peft_adapter(model, tmp_path)
    again = lora.load_peft_adapter(_copy(tiny), tmp_path)
    idx = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_peft_adapter(GPT(GPTConfig(1024, 128, 1, 2, 32)).eval(), tmp_path)


def test_apply_lora_refuses_unknown_targets(tiny):
    model = _copy(tiny)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply_lora(model, targets=("q_proj",))
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def test_lora_adapters_follow_the_base_layers_dtype(tiny):
    base = _copy(tiny).to(torch.bfloat16)
    idx = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = base(idx)
        model = lora.apply_lora(_copy(base), r=4, alpha=8)
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)  # B = 0
    for layer in lora.lora_layers(model).values():
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.lora_B.grad.dtype == torch.bfloat16
    assert layer.lora_B.grad.abs().sum() > 0


def test_second_apply_lora_refuses_and_leaves_the_model_alone(tiny):
    model = lora.apply_lora(_copy(tiny), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, r=2, alpha=4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.lora_config["r"] == 4 and len(lora.lora_layers(model)) == 6


# --- DPO


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    loss, r_w, r_l = dpo.dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    assert torch.equal(r_w, torch.zeros(3)) and torch.equal(r_l, torch.zeros(3))


def test_dpo_loss_matches_a_hand_computation():
    # policy moved +2 nats on chosen, -1 on rejected; beta 0.5: margin 0.5*(2+1)=1.5
    pi_w, pi_l, ref = torch.tensor([-8.0]), torch.tensor([-11.0]), torch.tensor([-10.0])
    loss, r_w, r_l = dpo.dpo_loss(pi_w, pi_l, ref, ref, 0.5)
    assert math.isclose(float(loss), math.log(1 + math.exp(-1.5)), rel_tol=1e-6)
    assert float(r_w) == 1.0 and float(r_l) == -0.5


def test_sequence_logprobs_sum_only_response_tokens(course):
    model, tok = course
    pair = tasks.load_pairs("test")[0]
    ((chosen, _),) = dpo.encode_pairs(tok, [pair])
    batch = sft.collate([chosen], sft.eos_id(tok), 128)
    with torch.no_grad():
        got = dpo.sequence_logprobs(model, batch["input_ids"], batch["targets"])
        logp = torch.log_softmax(model(batch["input_ids"]), -1)[0]
    n_prompt = len(tok.encode(sft.format_prompt(pair.instruction, pair.input)))
    ids = chosen[0]
    by_hand = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
    assert math.isclose(float(got), by_hand, rel_tol=1e-5)
    # the prompt's targets are ignored: whatever the model predicts there adds nothing
    assert (batch["targets"][0, : n_prompt - 1] == sft.IGNORE).all()

    def scrambled(upto: int):
        def forward(idx, attention_mask=None):
            logits = model(idx, attention_mask=attention_mask).clone()
            logits[:, :upto] = torch.randn_like(logits[:, :upto]) * 10
            return logits

        return forward

    with torch.no_grad():
        prompt_scrambled = dpo.sequence_logprobs(
            scrambled(n_prompt - 1), batch["input_ids"], batch["targets"]
        )
        one_more = dpo.sequence_logprobs(
            scrambled(n_prompt), batch["input_ids"], batch["targets"]
        )
    assert torch.equal(prompt_scrambled, got) and not torch.equal(one_more, got)
    # label the prompt's targets with its own next tokens: they now count, exactly
    targets = batch["targets"].clone()
    targets[0, : n_prompt - 1] = torch.tensor(ids[1:n_prompt])
    with torch.no_grad():
        with_prompt = dpo.sequence_logprobs(model, batch["input_ids"], targets)
    prompt_part = sum(float(logp[t - 1, ids[t]]) for t in range(1, n_prompt))
    assert math.isclose(float(with_prompt), by_hand + prompt_part, rel_tol=1e-5)


def test_dpo_gradient_pushes_margin_up(course):
    import copy

    model, tok = course
    policy = copy.deepcopy(model).train()
    encoded = dpo.encode_pairs(tok, tasks.load_pairs("test")[:16])
    ref = dpo.reference_logprobs(model, encoded)
    batch = next(dpo.pair_batches(encoded, ref, 16, 128))
    step = dpo.dpo_step(beta=0.1)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    loss0, m0 = step(policy, batch)
    assert math.isclose(loss0.item(), math.log(2), rel_tol=1e-4)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1, m1 = step(policy, batch)
    assert float(loss1) < loss0.item() and float(m1["reward_margin"]) > 0


# --- the fine-tuning loop and the shipped models


def test_train_on_batches_learns_and_trains_only_the_adapter(course):
    import copy

    from shared.train import TrainConfig, train_on_batches

    model, tok = course
    model = lora.apply_lora(copy.deepcopy(model), r=4, alpha=8)
    frozen = model.transformer.wte.weight.detach().clone()
    examples = tasks.load_examples("train")[:32]
    batches = sft.batches(sft.encode_examples(tok, examples), 8, sft.eos_id(tok), 128)
    cfg = TrainConfig(max_steps=12, batch_size=8, lr=5e-3, min_lr=5e-4,
                      warmup_steps=2, eval_interval=6, log_interval=4)  # fmt: skip
    calls = []

    def evaluate(step, m):
        calls.append((step, m.training))
        return {"response_loss": response_loss(m, tok, examples)}

    h = train_on_batches(model, batches, sft.sft_loss, cfg, evaluate=evaluate,
                         progress=False)  # fmt: skip
    assert [s for s, _ in calls] == [0, 6, 12] and not any(t for _, t in calls)
    assert len(h["train"]) == 12 and all(r["step_s"] > 0 for r in h["train"])
    assert h["eval"][-1]["response_loss"] < h["eval"][0]["response_loss"]
    assert torch.equal(model.transformer.wte.weight, frozen)


@pytest.mark.parametrize("name", ["sft", "lora", "dpo"])
def test_shipped_finetuned_models_load_and_answer(name, course):
    base, tok = course
    model, tok2, info = load_course_model("cpu", name=name)
    # SFT and DPO speak the chat format (four marker tokens after the base's ids);
    # LoRA cannot train new embedding rows and keeps the base tokenizer
    expected = tok if name == "lora" else chat.with_chat_tokens(tok)
    assert tok2.fingerprint() == expected.fingerprint()
    assert model.config.vocab_size == expected.vocab_size
    assert bool(lora.lora_layers(model)) == (name == "lora")
    assert info["results"]["accuracy"]["all"] > 0.2  # the base model scores 0
    assert abs(info["results"]["play_bpc"] - 2.216) < 0.15  # it kept the play
    examples = [e for e in tasks.load_examples("test") if e.task == "repeat"][:16]
    acc, _ = task_accuracy(model, tok2, examples)
    assert acc["all"] > 0.2, acc


def test_load_course_model_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown course model"):
        load_course_model("cpu", name="rlhf")


def test_an_adapter_refuses_a_base_it_was_not_trained_on(tmp_path):
    from shared.checkpoint import CheckpointError

    base = shutil.copytree(MODELS_DIR / "shakespeare-laptop", tmp_path / "base")
    adapter = shutil.copytree(MODELS_DIR / "shakespeare-lora", tmp_path / "lora")
    course = json.loads((adapter / "course.json").read_text())
    course["base"] = "../base"
    (adapter / "course.json").write_text(json.dumps(course))
    load_course_model("cpu", path=adapter)  # the base it was trained on
    # the base retrained (a consistent folder: here the SFT model's files)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        shutil.copyfile(MODELS_DIR / "shakespeare-sft" / name, base / name)
    load_course_model("cpu", path=base)  # fine on its own
    with pytest.raises(CheckpointError) as refused:
        load_course_model("cpu", path=adapter)
    message = str(refused.value)
    assert f"is not the base model the LoRA adapter {adapter} was trained on" in message
    assert "train_finetuned.py lora" in message


# --- task files: bad rows are errors that name the file and the line


@pytest.mark.parametrize("loader", ["examples", "pairs"])
@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "is empty"),
        (["", "  "], "is empty"),
        (["{good}", '{"task": 1'], "line 2: not valid JSON"),
        (["{good}", "[1, 2]"], "line 2: not a JSON object"),
        (["{good}", "{lacks}"], "line 2: lacks the field.s. output"),
        (["{good}", "{extra}"], "line 2: unknown field.s. speaker"),
        (["{number}"], "line 1: 'input' is not a string: 3"),
    ],
    ids=["empty", "blank", "json", "object", "missing", "unknown", "type"],
)
def test_task_files_name_the_file_and_the_line(tmp_path, loader, lines, message):
    row = (tasks.load_examples if loader == "examples" else tasks.load_pairs)("test")[0]
    good = dict(row.__dict__)
    rows = {"{good}": good, "{number}": good | {"input": 3}}
    rows["{lacks}"] = {k: v for k, v in good.items() if k not in ("output", "chosen")}
    rows["{extra}"] = good | {"speaker": "ROMEO"}
    if loader == "pairs":
        message = message.replace("output", "chosen")
    text = "\n".join(json.dumps(rows[x]) if x in rows else x for x in lines)
    name = "instructions" if loader == "examples" else "preferences"
    (tmp_path / f"{name}-test.jsonl").write_text(text)
    load = tasks.load_examples if loader == "examples" else tasks.load_pairs
    with pytest.raises(ValueError, match=message) as bad:
        load("test", folder=tmp_path)
    assert str(tmp_path / f"{name}-test.jsonl") in str(bad.value)
