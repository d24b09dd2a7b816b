"""Train and ship chapter 07's models: SFT, LoRA and DPO, from the shipped base model.

  python chapters/07_finetuning_dpo/train_finetuned.py sft        # -> shakespeare-sft
  python chapters/07_finetuning_dpo/train_finetuned.py sft_no_replay  # replay's control
  python chapters/07_finetuning_dpo/train_finetuned.py unmasked   # masking's control
  python chapters/07_finetuning_dpo/train_finetuned.py sft_varied # four wordings each
  python chapters/07_finetuning_dpo/train_finetuned.py lora       # -> shakespeare-lora
  python chapters/07_finetuning_dpo/train_finetuned.py dpo        # -> shakespeare-dpo
  python chapters/07_finetuning_dpo/train_finetuned.py dpo_nll    # DPO's control
  python chapters/07_finetuning_dpo/train_finetuned.py dpo_plain  # without the NLL term
  python chapters/07_finetuning_dpo/train_finetuned.py grpo       # RL from the checker

Recipes: ``shared.recipes.finetune_recipe()``. SFT and DPO train the chat format
(``shared.chat``: the tokenizer gains four marker tokens, the model four embedding
rows); LoRA keeps the text template (its frozen embedding table cannot learn new
rows). Every run but ``sft_no_replay`` mixes replayed play text into each step. Each
run writes its history and measured results (held-out task accuracy and play
bits/char) to ``chapters/07_finetuning_dpo/results/<run>.json`` (read by the notebook)
and ships its model to ``data/models/`` (the controls ship nothing). The DPO runs
start from the shipped SFT model, so run ``sft`` first. One thread, seeded: a rerun
gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from shared import chat, dpo, grpo, lora, sft, tasks
from shared.data import write_files
from shared.dataset import BatchSampler
from shared.device import describe_environment
from shared.evaluation import response_loss, task_accuracy
from shared.loss import bits_per_char, evaluate_split
from shared.pretrained import (
    COURSE_MODELS,
    MODELS_DIR,
    as_ids,
    load_course_model,
    save_course_model,
    shakespeare_splits,
    weights_sha256,
)
from shared.recipes import finetune_recipe
from shared.train import TrainConfig, train_on_batches

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ACCURACY_EVERY = 500  # task accuracy (generation) is slower than a loss


def machine() -> dict:
    """Where the numbers were measured (the load average says how shared it was)."""
    return describe_environment() | {"load average at end": os.getloadavg()}


_SPLITS: dict = {}


def play_splits(tokenizer) -> dict:
    """Tiny Shakespeare's token ids (the base tokenizer's: chat tokens never occur)."""
    if not _SPLITS:
        _SPLITS.update(shakespeare_splits(tokenizer))
    return _SPLITS


def play_bpc(model, tokenizer) -> float:
    """Held-out Tiny Shakespeare bits/char, as chapter 04 measures the base model."""
    splits = play_splits(tokenizer)
    val = as_ids(splits["val_ids"])
    return bits_per_char(evaluate_split(model, val, batch_size=32), len(val),
                         splits["val_chars"])  # fmt: skip


def sft_evaluator(tokenizer, test: list, accuracy_every: int = ACCURACY_EVERY):
    """Held-out response loss and play bits/char at every evaluation, task accuracy
    every so often."""

    def evaluate(step: int, model) -> dict:
        rec = {"response_loss": response_loss(model, tokenizer, test),
               "play_bpc": play_bpc(model, tokenizer)}  # fmt: skip
        if step % accuracy_every == 0:
            rec["accuracy"], _ = task_accuracy(model, tokenizer, test)
        return rec

    return evaluate


def chat_model(model, tokenizer):
    """The tokenizer with the chat markers, the model with their embedding rows."""
    tokenizer = chat.with_chat_tokens(tokenizer)
    chat.grow_embeddings(model, tokenizer.vocab_size - model.config.vocab_size)
    return model, tokenizer


def replayed(batches, loss_fn, model, tokenizer, replay_weight: float, seed: int):
    """Batches and loss with ``replay_weight`` of play text mixed in (0: unchanged)."""
    if not replay_weight:
        return batches, loss_fn
    recipe = finetune_recipe()
    windows = BatchSampler(as_ids(play_splits(tokenizer)["train_ids"]),
                           recipe.replay_windows, model.config.context_length,
                           seed=seed)  # fmt: skip
    return sft.with_replay(batches, windows), sft.replay_loss(loss_fn, replay_weight)


def run_sft(
    model,
    tokenizer,
    cfg: TrainConfig,
    mask_prompt: bool = True,
    progress: bool = True,
    replay_weight: float = 0.0,
    max_turns: int = 1,
    vary_wording: bool = False,
) -> dict:
    """Fine-tune ``model`` in place on the instruction set; returns the history.

    ``vary_wording`` asks each training example in one of four wordings
    (``tasks.vary_instructions``) instead of always the same one.
    """
    train, test = tasks.load_examples("train"), tasks.load_examples("test")
    if vary_wording:
        train = tasks.vary_instructions(train, seed=cfg.seed)
    ctx = model.config.context_length
    encoded = chat.encode_examples(tokenizer, train, mask_prompt, max_turns, ctx,
                                   seed=cfg.seed)  # fmt: skip
    batches = sft.batches(encoded, cfg.batch_size, chat.stop_id(tokenizer), ctx,
                          seed=cfg.seed)  # fmt: skip
    batches, loss_fn = replayed(batches, sft.sft_loss, model, tokenizer,
                                replay_weight, cfg.seed)  # fmt: skip
    return train_on_batches(model, batches, loss_fn, cfg,
                            evaluate=sft_evaluator(tokenizer, test),
                            progress=progress)  # fmt: skip


def summarise(history: dict, model, tokenizer, wall_s: float) -> dict:
    """Final held-out numbers and timings of a run."""
    test = tasks.load_examples("test")
    accuracy, responses = task_accuracy(model, tokenizer, test)
    steps = sorted(r["step_s"] for r in history["train"])
    return {
        "accuracy": accuracy,
        "n_test": len(test),
        # per held-out example, in file order: for paired tests between runs
        "correct": [
            tasks.check_answer(e, r) for e, r in zip(test, responses, strict=True)
        ],
        "play_bpc": play_bpc(model, tokenizer),
        # instruction following beyond the trained wordings (chapter 07, 7.12)
        "accuracy_paraphrased": task_accuracy(
            model, tokenizer, tasks.load_examples("paraphrased")
        )[0],
        "accuracy_unseen": task_accuracy(
            model, tokenizer, tasks.load_examples("unseen")
        )[0]["all"],
        "response_loss": response_loss(model, tokenizer, test),
        "train_wall_s": wall_s,
        "step_s_median": steps[len(steps) // 2],
        "trainable_params": lora.trainable_parameters(model),
        "samples": [
            {"task": e.task, "input": e.input, "answer": e.output, "response": r}
            for e, r in list(zip(test, responses, strict=True))[:20]
        ],
    }


def write_results(name: str, record: dict) -> None:
    """``results/<name>.json``, replaced only once complete (never half a file)."""
    write_files(RESULTS, {f"{name}.json": json.dumps(record, indent=1) + "\n"})
    print(f"wrote {RESULTS / name}.json")


def base_sha256(name: str) -> str:
    """The SHA-256 of a shipped model's weights, recorded by the models made from it:
    ``load_course_model`` refuses an adapter whose base has changed since."""
    return weights_sha256(MODELS_DIR / COURSE_MODELS[name])


def cmd_sft(run: str) -> None:
    """``sft`` (ships), ``sft_no_replay`` and ``unmasked`` (controls), ``sft_varied``
    (four wordings per instruction, for the held-out paraphrases)."""
    recipe = finetune_recipe()
    replay = 0.0 if run == "sft_no_replay" else recipe.replay_weight
    mask_prompt = run != "unmasked"
    model, tokenizer, base_info = load_course_model("cpu")
    base_hash = base_sha256("base")  # the weights just loaded
    model, tokenizer = chat_model(model, tokenizer)
    model.train()
    t0 = time.perf_counter()
    history = run_sft(model, tokenizer, recipe.sft, mask_prompt, replay_weight=replay,
                      max_turns=recipe.max_turns,
                      vary_wording=run == "sft_varied")  # fmt: skip
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results["machine"] = machine()
    settings = {"mask_prompt": mask_prompt, "replay_weight": replay,
                "replay_windows": recipe.replay_windows, "max_turns": recipe.max_turns,
                "format": "chat"}  # fmt: skip
    write_results(run, {"config": recipe.sft.to_dict(), **settings,
                        "history": history, "results": results})  # fmt: skip
    if run != "sft":
        return
    info = {
        "name": COURSE_MODELS["sft"],
        "description": "The course's Shakespeare model after supervised "
        "fine-tuning on data/finetune/instructions-train.jsonl in the chat format "
        "(shared.chat; loss on assistant turns), half of each step's loss on "
        "replayed play text; chapter 07.",
        "base": COURSE_MODELS["base"],
        "base_weights_sha256": base_hash,
        "base_results": base_info["results"],
        "train_config": recipe.sft.to_dict(),
        **settings,
        "results": {k: v for k, v in results.items() if k != "samples"},
    }
    save_course_model(model, tokenizer, MODELS_DIR / COURSE_MODELS["sft"], info)


def cmd_lora() -> None:
    recipe = finetune_recipe()
    model, tokenizer, _ = load_course_model("cpu")
    base_hash = base_sha256("base")  # the weights just loaded
    lora.apply_lora(model, recipe.lora_r, recipe.lora_alpha, recipe.lora_targets)
    model.train()
    t0 = time.perf_counter()
    history = run_sft(model, tokenizer, recipe.lora, replay_weight=recipe.replay_weight)
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results["machine"] = machine()
    settings = {
        "replay_weight": recipe.replay_weight,
        "replay_windows": recipe.replay_windows,
        "format": "text template",
    }
    write_results("lora", {"config": recipe.lora.to_dict(), **settings,
                           "history": history, "lora": model.lora_config,
                           "results": results})  # fmt: skip
    info = {
        "name": COURSE_MODELS["lora"],
        "description": "A LoRA adapter (PEFT format) on the course's Shakespeare "
        "model, trained on the same instruction data and budget as the SFT model "
        "(text template, half of each step's loss on replayed play text).",
        "base": f"../{COURSE_MODELS['base']}",
        "base_weights_sha256": base_hash,
        "train_config": recipe.lora.to_dict(),
        **settings,
        "results": {k: v for k, v in results.items() if k != "samples"},
    }
    folder = MODELS_DIR / COURSE_MODELS["lora"]
    lora.save_peft_adapter(model, folder, base_model=info["base"], extra=info)


def dpo_run(
    policy,
    tokenizer,
    cfg: TrainConfig,
    beta: float,
    sft_weight: float = 0.0,
    progress: bool = True,
    dpo_weight: float = 1.0,
    replay_weight: float = 0.0,
):
    """DPO on the committed pairs against a frozen copy of ``policy``; history.

    ``dpo_weight=0`` is the NLL-only control: the same batches in the same order.
    """
    reference = copy.deepcopy(policy).eval()
    train = dpo.encode_pairs(tokenizer, tasks.load_pairs("train"))
    test = dpo.encode_pairs(tokenizer, tasks.load_pairs("test"))
    ref_train = dpo.reference_logprobs(reference, train)
    ref_test = dpo.reference_logprobs(reference, test)
    batches = dpo.pair_batches(train, ref_train, cfg.batch_size,
                               policy.config.context_length, seed=cfg.seed)  # fmt: skip
    step = dpo.dpo_step(beta, sft_weight, dpo_weight)
    batches, step = replayed(batches, step, policy, tokenizer, replay_weight, cfg.seed)

    def evaluate(step: int, model) -> dict:
        return dpo.preference_metrics(model, test, ref_test, beta) | {
            "play_bpc": play_bpc(model, tokenizer)
        }

    return train_on_batches(policy, batches, step, cfg, evaluate=evaluate,
                            progress=progress)  # fmt: skip


def cmd_dpo(run: str) -> None:
    """``dpo`` (ships), ``dpo_nll`` (the NLL term alone) and ``dpo_plain`` (no NLL)."""
    recipe = finetune_recipe()
    model, tokenizer, sft_info = load_course_model("cpu", name="sft")
    base_hash = base_sha256("sft")  # the weights just loaded
    before = task_accuracy(model, tokenizer, tasks.load_examples("test"))[0]
    model.train()
    t0 = time.perf_counter()
    weight = 0.0 if run == "dpo_plain" else recipe.dpo_sft_weight
    dpo_weight = 0.0 if run == "dpo_nll" else 1.0
    history = dpo_run(model, tokenizer, recipe.dpo, recipe.beta, weight,
                      dpo_weight=dpo_weight,
                      replay_weight=recipe.replay_weight)  # fmt: skip
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results.update(
        accuracy_before=before,
        preference=history["eval"][-1],
        preference_before=history["eval"][0],
        machine=machine(),
    )
    settings = {"beta": recipe.beta, "sft_weight": weight, "dpo_weight": dpo_weight,
                "replay_weight": recipe.replay_weight, "format": "chat"}  # fmt: skip
    write_results(run, {"config": recipe.dpo.to_dict(), **settings,
                        "history": history, "results": results})  # fmt: skip
    if run != "dpo":
        return  # the comparison runs ship nothing
    info = {
        "name": COURSE_MODELS["dpo"],
        "description": "The course's SFT model after DPO on data/finetune/"
        "preferences-train.jsonl (reference: the SFT model), with the NLL term on "
        "chosen answers and replayed play text; chapter 07.",
        "base": COURSE_MODELS["sft"],
        "base_weights_sha256": base_hash,
        **settings,
        "train_config": recipe.dpo.to_dict(),
        "results": {k: v for k, v in results.items() if k != "samples"},
    }
    save_course_model(model, tokenizer, MODELS_DIR / COURSE_MODELS["dpo"], info)


def cmd_grpo() -> None:
    """GRPO from the shipped SFT model, rewarded by the tasks' checker; ships nothing
    (its results, per-example correctness included, go to ``results/grpo.json``)."""
    recipe = finetune_recipe()
    cfg = recipe.grpo
    model, tokenizer, _ = load_course_model("cpu", name="sft")
    test = tasks.load_examples("test")
    before = {"accuracy": task_accuracy(model, tokenizer, test)[0],
              "play_bpc": play_bpc(model, tokenizer)}  # fmt: skip

    def evaluate(step: int, m) -> dict:
        rec = {"play_bpc": play_bpc(m, tokenizer)}
        if step % 100 == 0:
            rec["accuracy"], _ = task_accuracy(m, tokenizer, test)
        return rec

    model.train()
    t0 = time.perf_counter()
    history = grpo.grpo_train(
        model, tokenizer, tasks.load_examples("train"), cfg,
        group_size=recipe.grpo_group, prompts_per_step=cfg.batch_size,
        beta=recipe.grpo_beta, max_new_tokens=recipe.grpo_max_new_tokens,
        seed=cfg.seed, evaluate=evaluate, progress=True,
    )  # fmt: skip
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results["before"] = before
    results["samples_drawn"] = cfg.max_steps * cfg.batch_size * recipe.grpo_group
    results["machine"] = machine()
    settings = {"group_size": recipe.grpo_group, "beta": recipe.grpo_beta,
                "max_new_tokens": recipe.grpo_max_new_tokens, "format": "chat",
                "loss_type": "grpo", "temperature": 1.0}  # fmt: skip
    write_results("grpo", {"config": cfg.to_dict(), **settings, "history": history,
                           "results": results})  # fmt: skip


RUNS = {
    "sft": lambda: cmd_sft("sft"),
    "sft_no_replay": lambda: cmd_sft("sft_no_replay"),
    "unmasked": lambda: cmd_sft("unmasked"),
    "sft_varied": lambda: cmd_sft("sft_varied"),
    "lora": cmd_lora,
    "dpo": lambda: cmd_dpo("dpo"),
    "dpo_nll": lambda: cmd_dpo("dpo_nll"),
    "dpo_plain": lambda: cmd_dpo("dpo_plain"),
    "grpo": cmd_grpo,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=list(RUNS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reproducible, and two runs can share two cores
    RUNS[args.run]()


if __name__ == "__main__":
    main()
