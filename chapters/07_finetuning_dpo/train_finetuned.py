"""Train and ship chapter 07's models: SFT, LoRA and DPO, from the shipped base model.

  python chapters/07_finetuning_dpo/train_finetuned.py sft       # -> shakespeare-sft
  python chapters/07_finetuning_dpo/train_finetuned.py unmasked  # the masking control
  python chapters/07_finetuning_dpo/train_finetuned.py lora      # -> shakespeare-lora
  python chapters/07_finetuning_dpo/train_finetuned.py dpo       # -> shakespeare-dpo
  python chapters/07_finetuning_dpo/train_finetuned.py dpo_plain # without the NLL term

Recipes: ``shared.recipes.finetune_recipe()``. Each run writes its history and
measured results to ``chapters/07_finetuning_dpo/results/<run>.json`` (read by the
notebook) and ships its model to ``data/models/`` (``unmasked`` ships nothing).
``dpo`` starts from the shipped SFT model, so run ``sft`` first. One thread, seeded:
a rerun gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from shared import dpo, lora, sft, tasks
from shared.data import write_files
from shared.device import describe_environment
from shared.evaluation import task_accuracy
from shared.pretrained import (
    COURSE_MODELS,
    MODELS_DIR,
    load_course_model,
    save_course_model,
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


def sft_evaluator(tokenizer, test: list, accuracy_every: int = ACCURACY_EVERY):
    """Held-out response loss at every evaluation, task accuracy every so often."""

    def evaluate(step: int, model) -> dict:
        rec = {"response_loss": sft.response_loss(model, tokenizer, test)}
        if step % accuracy_every == 0:
            rec["accuracy"], _ = task_accuracy(model, tokenizer, test)
        return rec

    return evaluate


def run_sft(
    model, tokenizer, cfg: TrainConfig, mask_prompt: bool = True, progress: bool = True
) -> dict:
    """Fine-tune ``model`` in place on the instruction set; returns the history."""
    train, test = tasks.load_examples("train"), tasks.load_examples("test")
    encoded = sft.encode_examples(tokenizer, train, mask_prompt=mask_prompt)
    batches = sft.batches(encoded, cfg.batch_size, sft.eos_id(tokenizer),
                          model.config.context_length, seed=cfg.seed)  # fmt: skip
    return train_on_batches(model, batches, sft.sft_loss, cfg,
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
        "response_loss": sft.response_loss(model, tokenizer, test),
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


def cmd_sft(mask_prompt: bool) -> None:
    recipe = finetune_recipe()
    model, tokenizer, base_info = load_course_model("cpu")
    base_hash = base_sha256("base")  # the weights just loaded
    model.train()
    t0 = time.perf_counter()
    history = run_sft(model, tokenizer, recipe.sft, mask_prompt)
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results["machine"] = machine()
    name = "sft" if mask_prompt else "sft_unmasked"
    write_results(name, {"config": recipe.sft.to_dict(), "mask_prompt": mask_prompt,
                         "history": history, "results": results})  # fmt: skip
    if mask_prompt:
        info = {
            "name": COURSE_MODELS["sft"],
            "description": "The course's Shakespeare model after supervised "
            "fine-tuning on data/finetune/instructions-train.jsonl (prompt tokens "
            "masked); chapter 07.",
            "base": COURSE_MODELS["base"],
            "base_weights_sha256": base_hash,
            "base_results": base_info["results"],
            "train_config": recipe.sft.to_dict(),
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
    history = run_sft(model, tokenizer, recipe.lora, mask_prompt=True)
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results["machine"] = machine()
    write_results("lora", {"config": recipe.lora.to_dict(), "history": history,
                           "lora": model.lora_config, "results": results})  # fmt: skip
    info = {
        "name": COURSE_MODELS["lora"],
        "description": "A LoRA adapter (PEFT format) on the course's Shakespeare "
        "model, trained on the same instruction data and budget as the SFT model.",
        "base": f"../{COURSE_MODELS['base']}",
        "base_weights_sha256": base_hash,
        "train_config": recipe.lora.to_dict(),
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
):
    """DPO on the committed pairs against a frozen copy of ``policy``; history."""
    reference = copy.deepcopy(policy).eval()
    train = dpo.encode_pairs(tokenizer, tasks.load_pairs("train"))
    test = dpo.encode_pairs(tokenizer, tasks.load_pairs("test"))
    ref_train = dpo.reference_logprobs(reference, train)
    ref_test = dpo.reference_logprobs(reference, test)
    batches = dpo.pair_batches(train, ref_train, cfg.batch_size,
                               policy.config.context_length, seed=cfg.seed)  # fmt: skip

    def evaluate(step: int, model) -> dict:
        return dpo.preference_metrics(model, test, ref_test, beta)

    return train_on_batches(policy, batches, dpo.dpo_step(beta, sft_weight), cfg,
                            evaluate=evaluate, progress=progress)  # fmt: skip


def cmd_dpo(plain: bool = False) -> None:
    recipe = finetune_recipe()
    model, tokenizer, sft_info = load_course_model("cpu", name="sft")
    base_hash = base_sha256("sft")  # the weights just loaded
    before = task_accuracy(model, tokenizer, tasks.load_examples("test"))[0]
    model.train()
    t0 = time.perf_counter()
    weight = recipe.dpo_sft_weight if not plain else 0.0
    history = dpo_run(model, tokenizer, recipe.dpo, recipe.beta, weight)
    results = summarise(history, model, tokenizer, time.perf_counter() - t0)
    results.update(
        accuracy_before=before,
        preference=history["eval"][-1],
        preference_before=history["eval"][0],
        machine=machine(),
    )
    name = "dpo_no_sft_term" if plain else "dpo"
    write_results(name, {"config": recipe.dpo.to_dict(), "beta": recipe.beta,
                         "sft_weight": weight,
                          "history": history, "results": results})  # fmt: skip
    if plain:
        return  # the comparison run ships nothing
    info = {
        "name": COURSE_MODELS["dpo"],
        "description": "The course's SFT model after DPO on data/finetune/"
        "preferences-train.jsonl (reference: the SFT model); chapter 07.",
        "base": COURSE_MODELS["sft"],
        "base_weights_sha256": base_hash,
        "beta": recipe.beta,
        "sft_weight": weight,
        "train_config": recipe.dpo.to_dict(),
        "results": {k: v for k, v in results.items() if k != "samples"},
    }
    save_course_model(model, tokenizer, MODELS_DIR / COURSE_MODELS["dpo"], info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=["sft", "unmasked", "lora", "dpo", "dpo_plain"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reproducible, and two runs can share two cores
    {"sft": lambda: cmd_sft(True), "unmasked": lambda: cmd_sft(False),
     "lora": cmd_lora, "dpo": cmd_dpo,
     "dpo_plain": lambda: cmd_dpo(plain=True)}[args.run]()  # fmt: skip


if __name__ == "__main__":
    main()
