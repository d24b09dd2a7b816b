"""Direct Preference Optimization (Rafailov et al., 2023): no reward model needed.

For a prompt x with a chosen response y_w and a rejected one y_l, the policy pi and a
frozen reference pi_ref (the SFT model) give each response an *implicit reward*
``beta * (log pi(y | x) - log pi_ref(y | x))``, where a log-probability is summed over
the response's tokens only. The loss pushes the chosen reward above the rejected:
``-log sigmoid(r_w - r_l)``. ``beta`` sets how far the policy may move from the
reference. Sequences are built by ``shared.chat.encode_instruction`` (the chat
format for a tokenizer with the chat markers, else the text template of ``shared.sft``;
prompt masked with -100, the end marker appended), which is also how TRL's
``DPOTrainer`` builds them from the exported tokenizer.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.chat import encode_instruction, format_chat, instruction_messages
from shared.model import evaluating
from shared.sft import IGNORE, collate, format_prompt
from shared.tasks import Pair

EncodedPair = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sequence (B,): the summed log-probability of the labelled targets.

    Positions whose target is -100 (prompt, padding) add nothing.
    """
    logits = model(input_ids, attention_mask=attention_mask)
    logp = torch.log_softmax(logits.float(), dim=-1)
    labelled = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * labelled).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (mean over pairs) and the implicit rewards of both responses."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def encode_pairs(tokenizer, pairs: Sequence[Pair]) -> list[EncodedPair]:
    """Each pair as (chosen, rejected) ``(ids, labels)``, the prompt labelled -100."""
    out = []
    for p in pairs:
        both = [encode_instruction(tokenizer, p.instruction, p.input, answer)
                for answer in (p.chosen, p.rejected)]  # fmt: skip
        out.append((both[0], both[1]))
    return out


def collate_pairs(
    encoded: Sequence[EncodedPair], pad_id: int, context_length: int
) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows: all chosen, then all rejected (one forward)."""
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    return collate(rows, pad_id, context_length)


def _forward_pairs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    logps = sequence_logprobs(
        model, batch["input_ids"].to(device), batch["targets"].to(device),
        batch["attention_mask"].to(device),
    )  # fmt: skip
    half = logps.size(0) // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def reference_logprobs(
    reference: nn.Module, encoded: Sequence[EncodedPair], batch_size: int = 64
) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected) under the frozen reference.

    Computed once before training: the reference never changes, so its forward pass
    need not be repeated every step.
    """
    with evaluating(reference):
        ctx, pad = reference.config.context_length, _pad_of(encoded)
        out = []
        for i in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[i : i + batch_size], pad, ctx)
            out.append(torch.stack(_forward_pairs(reference, batch), dim=1).cpu())
    return torch.cat(out)


def _pad_of(encoded: Sequence[EncodedPair]) -> int:
    return encoded[0][0][0][-1]  # every sequence ends with <|endoftext|>


def pair_batches(
    encoded: Sequence[EncodedPair],
    ref_logps: torch.Tensor,
    batch_size: int,
    context_length: int,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of pairs forever, each with its rows' reference log-probs."""
    rng = random.Random(seed)
    order, pad = list(range(len(encoded))), _pad_of(encoded)
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[i : i + batch_size]
            batch = collate_pairs([encoded[j] for j in rows], pad, context_length)
            batch["ref_logps"] = ref_logps[rows]
            yield batch


def dpo_step(beta: float, sft_weight: float = 0.0, dpo_weight: float = 1.0):
    """A ``loss_fn(model, batch)`` for ``shared.train.train_on_batches``.

    ``dpo_weight=0`` with ``sft_weight`` > 0 is DPO's control: the same batches and
    steps, the chosen answers' NLL alone (the preference term is computed and logged,
    not trained on).

    ``sft_weight`` > 0 adds that much of the SFT loss on the chosen answers (their
    mean negative log-likelihood per token), which keeps DPO from lowering the
    probability of good answers along with bad ones (Pang et al., 2024, "RPO"; TRL:
    ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, sft_weight]``).
    """

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = _forward_pairs(model, batch)
        ref = batch["ref_logps"].to(chosen.device)
        dpo, r_w, r_l = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)
        loss = dpo_weight * dpo
        metrics = {
            "dpo_loss": dpo.detach(),
            "reward_chosen": r_w.mean(),
            "reward_rejected": r_l.mean(),
            "reward_margin": (r_w - r_l).mean(),
            "reward_accuracy": (r_w > r_l).float().mean(),
        }
        if sft_weight:
            n_chosen = (batch["targets"][: chosen.size(0)] != IGNORE).sum()
            nll = -chosen.sum() / n_chosen.to(chosen.device)
            loss = loss + sft_weight * nll
            metrics["chosen_nll"] = nll.detach()
        return loss, metrics

    return loss_fn


@torch.no_grad()
def preference_metrics(
    model: nn.Module,
    encoded: Sequence[EncodedPair],
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out: DPO loss, reward accuracy and margin, and log-prob accuracy.

    ``reward_accuracy`` counts pairs whose implicit reward prefers the chosen
    response (0 for the reference itself: all rewards are 0, ties do not count);
    ``logprob_accuracy`` counts pairs where the model itself gives the chosen
    response the higher log-probability, which means something before training too.
    """
    with evaluating(model):
        ctx, pad = model.config.context_length, _pad_of(encoded)
        chosen, rejected = [], []
        for i in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[i : i + batch_size], pad, ctx)
            c, r = _forward_pairs(model, batch)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    loss, r_w, r_l = dpo_loss(chosen, rejected, ref_logps[:, 0], ref_logps[:, 1], beta)
    return {
        "loss": float(loss),
        "reward_accuracy": float((r_w > r_l).float().mean()),
        "reward_margin": float((r_w - r_l).mean()),
        "logprob_accuracy": float((chosen > rejected).float().mean()),
    }


def _prompt_text(pair: Pair, chat: bool) -> str:
    """The prompt as text: the chat generation prompt (its markers are special tokens
    to a Hugging Face tokenizer) or the text template."""
    if chat:
        return format_chat(instruction_messages(pair.instruction, pair.input), True)
    return format_prompt(pair.instruction, pair.input)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Switch off the progress bars of ``datasets`` and ``transformers`` for a block."""
    import datasets
    from transformers.utils import logging

    was_on = datasets.is_progress_bar_enabled(), logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on[0]:
            datasets.enable_progress_bars()
        if was_on[1]:
            logging.enable_progress_bar()


def trl_dpo_train(
    hf_dir: str | Path,
    pairs: Sequence[Pair],
    beta: float = 0.1,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    out_dir: str | Path | None = None,
    min_lr: float | None = None,
    warmup_steps: int = 0,
    sft_weight: float = 0.0,
) -> list[dict]:
    """DPO with Hugging Face TRL's ``DPOTrainer`` on the course's pairs; step records.

    Starts from an exported folder (``shared.hf_export.export_hf``); the reference is a
    second, frozen copy of the same weights. Prompts, chosen and rejected responses
    are the course's strings, and TRL turns them into the token ids ``encode_pairs``
    makes (tested). Returns one record per step: ``step``, ``loss``, ``reward_*``
    (as ``dpo_step`` logs them), ``lr`` and ``grad_norm``. With ``out_dir`` the
    trained model is saved there as a Hugging Face folder. ``sft_weight`` > 0 adds
    the SFT loss on the chosen answers as ``dpo_step`` does (TRL's
    ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, sft_weight]``; ``loss``
    is then the weighted sum).

    The optimizer is set as ``train_on_batches`` with ``TrainConfig(lr, min_lr
    (default lr / 10), warmup_steps, weight_decay=0.0, betas=(0.9, 0.99),
    grad_clip=1.0)``: AdamW (torch's), cosine to ``min_lr`` (TRL's default is a
    linear decay to 0, beta2 0.999 and bf16). What still differs from the course:

    * the schedule is exact without warmup; with warmup, Hugging Face's decay runs
      one step ahead of ``lr_at`` (its warmup is the same);
    * batches: the same pairs per epoch, last partial batch dropped, but drawn by a
      seeded torch sampler, not ``random.Random(seed)``: another order;
    * the reference runs a forward pass every step (the course computes its
      log-probs once): the same numbers up to float rounding;
    * TRL switches dropout off in the policy (the course trains with it; the
      shipped models have none) and computes log-probs in tiles (float rounding);
    * sequences are cut to the model's context (the course takes one token more,
      a target only, and refuses longer ones; its longest pair has 127 tokens).
    """
    import os
    import tempfile

    if not torch.cuda.is_available():  # DeepSpeed, imported by accelerate, would warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from shared.device import get_device

    if len(pairs) < batch_size:
        raise ValueError(f"{len(pairs)} pairs cannot fill one batch of {batch_size}")
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    chat = hf_tokenizer.chat_template is not None
    rows = [{"prompt": _prompt_text(p, chat), "chosen": p.chosen,
             "rejected": p.rejected} for p in pairs]  # fmt: skip
    # the records are the output: no progress bars, no printed log lines
    with _no_progress_bars(), tempfile.TemporaryDirectory() as scratch:
        policy = AutoModelForCausalLM.from_pretrained(hf_dir)
        args = DPOConfig(
            output_dir=str(out_dir or scratch), max_steps=steps, learning_rate=lr,
            per_device_train_batch_size=batch_size, beta=beta, seed=seed,
            # the course's optimizer: AdamW, cosine to min_lr, clipping at 1
            optim="adamw_torch", adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
            lr_scheduler_type=("cosine_warmup_with_min_lr" if warmup_steps
                               else "cosine_with_min_lr"),
            lr_scheduler_kwargs={"min_lr": lr / 10 if min_lr is None else min_lr},
            warmup_steps=warmup_steps, dataloader_drop_last=True,
            **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}
               if sft_weight else {}),
            max_length=policy.config.max_position_embeddings,
            # TRL's defaults are for big models on GPUs: bf16, gradient checkpointing
            bf16=False, gradient_checkpointing=False,
            use_cpu=get_device().type == "cpu", dataloader_num_workers=0,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=policy, ref_model=AutoModelForCausalLM.from_pretrained(hf_dir),
            args=args, train_dataset=datasets.Dataset.from_list(rows),
            processing_class=hf_tokenizer,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        if out_dir is not None:
            trainer.save_model(str(out_dir))
    names = {"loss": "loss", "reward_margin": "rewards/margins",
             "reward_accuracy": "rewards/accuracies", "reward_chosen": "rewards/chosen",
             "reward_rejected": "rewards/rejected", "lr": "learning_rate",
             "grad_norm": "grad_norm"}  # fmt: skip
    return [
        {"step": h["step"], **{k: float(h[v]) for k, v in names.items()}}
        for h in trainer.state.log_history
        if "rewards/margins" in h
    ]
