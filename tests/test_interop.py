"""The course against Hugging Face's libraries: PEFT loads the course's LoRA adapters
and gives the same logits; TRL's DPO builds the same sequences and computes the same
loss and rewards as ``shared.dpo``; ``trl_dpo_train`` runs offline."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import peft
import pytest
import torch

from shared import dpo, lora, sft, tasks
from shared.hf_export import export_hf
from shared.pretrained import load_course_model
from shared.train import TrainConfig, lr_at


@pytest.fixture(scope="module")
def course():
    model, tokenizer, _ = load_course_model("cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def base_dir(course, tmp_path_factory):
    """The shipped model as a Hugging Face GPT-2 folder."""
    return export_hf(*course, tmp_path_factory.mktemp("hf") / "base")


def _prompts(tokenizer, n: int = 3) -> list[torch.Tensor]:
    """Real course sequences: prompt + chosen response + <|endoftext|>, (1, T) each."""
    encoded = dpo.encode_pairs(tokenizer, tasks.load_pairs("test")[:n])
    return [torch.tensor([chosen[0]]) for chosen, _ in encoded]


# --- PEFT


def test_peft_applies_the_course_lora_adapter(course, base_dir, tmp_path, caplog):
    from transformers import GPT2LMHeadModel

    model, tok = course
    adapted = lora.apply_lora(copy.deepcopy(model), r=4, alpha=8,
                              targets=("c_attn", "c_proj"))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.normal_(std=0.05)  # B != 0: the adapter changes the outputs
    lora.save_peft_adapter(adapted, tmp_path, base_model=str(base_dir))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(base_dir), tmp_path
        ).eval()
    assert not [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    merged = lora.merge_lora(copy.deepcopy(adapted))
    with torch.no_grad():
        for ids in _prompts(tok):
            ours, base = adapted(ids), model(ids)
            theirs = hf(ids).logits
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
            assert (theirs - base).abs().max() > 0.1  # the adapter is applied
    hf = hf.merge_and_unload()
    assert isinstance(hf, GPT2LMHeadModel)
    with torch.no_grad():
        for ids in _prompts(tok):
            torch.testing.assert_close(hf(ids).logits, merged(ids), atol=1e-4, rtol=0)


# --- TRL's DPO


def _dpo_trainer(policy_dir, ref_dir, pairs, output_dir, **config):
    """A TRL DPOTrainer (CPU, float32) on the course's pairs; its dataset tokenized.

    ``config`` adds to or overrides the ``DPOConfig`` arguments.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": sft.format_prompt(p.instruction, p.input), "chosen": p.chosen,
             "rejected": p.rejected} for p in pairs]  # fmt: skip
    args = dict(
        output_dir=str(output_dir), beta=0.1, max_length=128, bf16=False,
        gradient_checkpointing=False, use_cpu=True, report_to="none",
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    ) | config  # fmt: skip
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=DPOConfig(**args), train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(ref_dir),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trl_setup(course, base_dir, tmp_path_factory):
    """A policy moved by one course DPO step, and a DPOTrainer with it and the base.

    The trainer holds all held-out pairs, so that all their token ids are compared.
    """
    model, tok = course
    pairs = tasks.load_pairs("test")
    encoded = dpo.encode_pairs(tok, pairs[:8])
    ref = dpo.reference_logprobs(model, encoded)
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    loss, _ = dpo.dpo_step(0.1)(policy, next(dpo.pair_batches(encoded, ref, 8, 128)))
    loss.backward()
    optimizer.step()
    policy.eval()
    policy_dir = export_hf(policy, tok, tmp_path_factory.mktemp("hf") / "policy")
    trainer = _dpo_trainer(policy_dir, base_dir, pairs, tmp_path_factory.mktemp("t"))
    return policy, pairs, trainer


def _trl_loss(trainer, model, n: int = 8) -> tuple[float, dict]:
    """TRL's loss on the first ``n`` pairs with ``model`` as the policy, and metrics."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    mode = "train" if trainer.model.training else "eval"
    return float(loss), {k: v[-1] for k, v in trainer._metrics[mode].items()}


def test_trl_sequences_are_the_course_sequences(course, trl_setup):
    _, tok = course
    _, pairs, trainer = trl_setup
    encoded = dpo.encode_pairs(tok, pairs)
    rows = zip(pairs, trainer.train_dataset, encoded, strict=True)
    for p, row, ((chosen, _), (rejected, _)) in rows:
        assert row["prompt_ids"] + row["chosen_ids"] == chosen
        assert row["prompt_ids"] + row["rejected_ids"] == rejected
        # the same tokens are scored: TRL's completion starts where the course's does
        prompt = sft.format_prompt(p.instruction, p.input)
        assert row["prompt_ids"] == tok.encode(prompt)


def test_trl_dpo_loss_and_rewards_equal_the_course(course, trl_setup):
    model, tok = course
    policy, pairs, trainer = trl_setup
    encoded = dpo.encode_pairs(tok, pairs[:8])
    batch = dpo.collate_pairs(encoded, sft.eos_id(tok), 128)
    with torch.no_grad():
        logps = dpo.sequence_logprobs(policy, batch["input_ids"], batch["targets"],
                                      batch["attention_mask"])  # fmt: skip
    ref = dpo.reference_logprobs(model, encoded)
    loss, r_w, r_l = dpo.dpo_loss(*logps.chunk(2), ref[:, 0], ref[:, 1], beta=0.1)
    trl_loss, metrics = _trl_loss(trainer, trainer.model)
    assert abs(float(loss) - math.log(2)) > 0.01  # the policy has moved
    assert math.isclose(trl_loss, float(loss), abs_tol=1e-5)
    assert math.isclose(metrics["rewards/chosen"], float(r_w.mean()), abs_tol=1e-5)
    assert math.isclose(metrics["rewards/rejected"], float(r_l.mean()), abs_tol=1e-5)
    margin = float((r_w - r_l).mean())
    assert math.isclose(metrics["rewards/margins"], margin, abs_tol=1e-5)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5, 1.0])
def test_trl_sigmoid_plus_sft_loss_equals_dpo_step(
    course, base_dir, trl_setup, tmp_path, sft_weight
):
    """``dpo_step(beta, sft_weight)`` is TRL's ``loss_type=["sigmoid", "sft"]``."""
    model, tok = course
    policy, pairs, trainer = trl_setup
    encoded = dpo.encode_pairs(tok, pairs[:8])
    batch = dpo.collate_pairs(encoded, sft.eos_id(tok), 128)
    batch["ref_logps"] = dpo.reference_logprobs(model, encoded)
    with torch.no_grad():
        ours = float(dpo.dpo_step(0.1, sft_weight)(policy, batch)[0])
    sft_trainer = _dpo_trainer(
        base_dir, base_dir, pairs[:8], tmp_path,
        loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_weight],
    )  # fmt: skip
    theirs, _ = _trl_loss(sft_trainer, trainer.model)  # the moved policy
    assert math.isclose(theirs, ours, abs_tol=1e-5)


def test_trl_dpo_loss_is_log2_at_the_reference(course, base_dir, tmp_path):
    model, tok = course
    pairs = tasks.load_pairs("test")[:8]
    ref = dpo.reference_logprobs(model, dpo.encode_pairs(tok, pairs))
    ours, r_w, r_l = dpo.dpo_loss(ref[:, 0], ref[:, 1], ref[:, 0], ref[:, 1])
    trainer = _dpo_trainer(base_dir, base_dir, pairs, tmp_path)  # policy == reference
    theirs, metrics = _trl_loss(trainer, trainer.model)
    assert math.isclose(float(ours), math.log(2), rel_tol=1e-6)
    assert math.isclose(theirs, float(ours), rel_tol=1e-6)
    assert metrics["rewards/chosen"] == float(r_w.mean()) == 0.0
    assert metrics["rewards/rejected"] == float(r_l.mean()) == 0.0


def test_trl_dpo_train_runs_offline(base_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pairs = tasks.load_pairs("train")[:16]
    records = dpo.trl_dpo_train(
        base_dir, pairs, steps=3, lr=1e-3, min_lr=1e-4, batch_size=8, out_dir=tmp_path
    )
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isclose(records[0]["loss"], math.log(2), abs_tol=1e-4)
    assert records[0]["reward_margin"] == 0.0
    cfg = TrainConfig(max_steps=3, lr=1e-3, min_lr=1e-4, warmup_steps=0)
    for r in records:  # the course's schedule
        assert math.isclose(r["lr"], lr_at(r["step"] - 1, cfg), rel_tol=1e-9)
    assert (tmp_path / "model.safetensors").exists()
