"""Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath): RL without a
value model.

For each prompt the policy samples a *group* of G completions; a program scores each
one (here ``shared.tasks.check_answer``: 1 right, 0 wrong). A completion's
*advantage* is its reward relative to its group, ``(r - mean) / (std + 1e-4)``, so
the group itself is the baseline that PPO would learn a value network for. Every
token of a completion shares its advantage, and the loss is PPO's clipped surrogate
per token plus a KL penalty that keeps the policy near a frozen reference::

    ratio = exp(logp - old_logp)
    loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * kl_t
    kl_t = exp(ref - logp) - (ref - logp) - 1   (k3 >= 0; TRL: x ratio, see grpo_loss)

``loss_type`` says how token losses become one number: ``"grpo"`` averages over each
completion's tokens, then over completions (short completions weigh more per
token); ``"dapo"`` averages over all tokens of the batch (no length bias; TRL's
default). Both equal TRL 1.16.0's ``GRPOTrainer`` loss (tested), which is also
where the ``1e-4``, the unbiased group std and the temperature-scaled log-probs come
from. With one gradient step per sampled batch (``num_iterations=1``, TRL's
default) ``old_logp`` is ``logp`` detached: the ratio is 1 and never clipped, but its
gradient is the policy gradient ``A * grad logp``.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from shared.attention import position_ids_from_mask
from shared.chat import prompt_ids, stop_id
from shared.model import evaluating
from shared.tasks import Example, check_answer
from shared.train import TrainConfig, train_on_batches

LOSS_TYPES = ("grpo", "dapo")
Reward = Callable[[Example, str], float]


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """(P, G) rewards of P groups -> (P, G) advantages: reward minus its group's mean,
    divided by the group's (unbiased) std + 1e-4 when ``scale``.

    A group whose rewards are all equal teaches nothing: its advantages are 0.
    ``scale=False`` is TRL's ``scale_rewards="none"`` (Dr. GRPO).
    """
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(
            f"rewards must be (groups, G >= 2), got {tuple(rewards.shape)}"
        )
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    beta: float = 0.04,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    unbiased_kl: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss from per-token log-probs (N, T) and advantages (N,); metrics.

    ``mask`` (N, T) is 1 on completion tokens (the stop token included), 0 on
    padding. ``epsilon_high`` (default ``epsilon``) is DAPO's wider upper clip.
    ``unbiased_kl`` multiplies the KL term by the ratio (TRL's default
    ``use_bias_correction_kl``, from DeepSeek-V3.2): its value stays k3 on-policy,
    but its gradient becomes ``(logp - ref) grad logp``, the gradient of KL(pi ||
    ref); k3 alone has the gradient ``(1 - pi_ref / pi) grad logp``, whose
    expectation is that of KL(ref || pi).
    Metrics (means over tokens): ``kl`` (the KL term, also when ``beta`` is 0),
    ``clip_ratio`` (tokens whose ratio left the clip range in the direction of their
    advantage: their gradient is 0) and ``ratio``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.reshape(-1, 1).to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    diff = ref_logps - logps
    kl = torch.exp(diff) - diff - 1
    if unbiased_kl:
        kl = kl * ratio
    if beta != 0.0:
        per_token = per_token + beta * kl
    n_tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":  # each completion's mean, then the mean of those
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # dapo: every token of the batch counts once
        loss = (per_token * mask).sum() / n_tokens
    cut = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    named = {"kl": kl, "clip_ratio": cut.to(logps.dtype), "ratio": ratio}
    metrics = {k: (x.detach() * mask).sum() / n_tokens for k, x in named.items()}
    return loss, metrics


def completion_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, L) log-probability of each completion token given everything before it.

    Prompts are left-padded (``prompt_mask`` 0), completions right-padded; positions
    count real tokens only, so a padded row reads as it would alone. The logits are
    divided by ``temperature`` (the distribution the tokens were sampled from, as in
    TRL). Log-probs come from logit - logsumexp, without a (N, L, V) log-softmax.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    # the logits at position t predict token t + 1: those of the completion
    logits = logits[:, prompt_ids.size(1) - 1 : -1].float() / temperature
    picked = logits.gather(-1, completion_ids[..., None])[..., 0]
    return picked - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------------------- sampling


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Prompts as left-padded ids (B, P) and their mask (1 = real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # every prompt has a token (checked)
        ids[row, width - len(p) :] = torch.tensor(list(p))
        mask[row, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Sample one completion per prompt, all rows at once (softmax at ``temperature``).

    Returns ``prompt_ids``/``prompt_mask`` (left-padded) and ``completion_ids``/
    ``completion_mask`` (N, L), L the longest completion: a row's mask covers its
    tokens up to and including its first ``stop_id`` and nothing after (those
    positions hold ``stop_id``). No KV cache: every step runs the whole window,
    cheap for the course's small models.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    pad = 0 if stop_id is None else stop_id
    p_ids, p_mask = left_pad(prompts, pad)
    room = model.config.context_length - p_ids.size(1)
    if max_new_tokens > room:
        raise ValueError(
            f"a prompt of {p_ids.size(1)} tokens leaves room for {room} new tokens in "
            f"the model's context of {model.config.context_length}, not "
            f"{max_new_tokens}: drop the long prompts or lower max_new_tokens"
        )
    ids, mask = p_ids.to(device), p_mask.to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_ids, new_mask = [], []
    with evaluating(model):
        for _ in range(max_new_tokens):
            positions = position_ids_from_mask(mask)
            logits = model(ids, attention_mask=mask, position_ids=positions)[:, -1]
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            token = torch.where(done, pad, token)
            new_ids.append(token)
            new_mask.append(~done)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            if stop_id is not None:
                done |= token == stop_id
                if done.all():
                    break
    return {"prompt_ids": p_ids, "prompt_mask": p_mask,
            "completion_ids": torch.stack(new_ids, 1).cpu(),
            "completion_mask": torch.stack(new_mask, 1).long().cpu()}  # fmt: skip


def sample_group(
    model: nn.Module,
    prompt_ids: Sequence[int],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_size`` completions of one prompt: ids and mask (G, L)."""
    out = sample_completions(model, [prompt_ids] * group_size, max_new_tokens,
                             temperature, stop_id, generator)  # fmt: skip
    return out["completion_ids"], out["completion_mask"]


def completion_texts(tokenizer, batch: dict[str, torch.Tensor], stop: int) -> list[str]:
    """Each completion decoded up to (not including) the stop token."""
    ids, mask = batch["completion_ids"], batch["completion_mask"].bool()
    kept = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
    return [tokenizer.decode(k[:-1] if k[-1:] == [stop] else k) for k in kept]


def answer_reward(example: Example, response: str) -> float:
    """1.0 when the response is exactly the example's answer, else 0.0."""
    return float(check_answer(example, response))


# ---------------------------------------------------------------------------- training


def rollout(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    reward_fn: Reward = answer_reward,
    generator: torch.Generator | None = None,
    old_logps: bool = False,
) -> dict[str, torch.Tensor]:
    """One GRPO batch: ``group_size`` completions of each example's prompt from the
    current policy, their ``rewards`` and ``advantages`` (N,), the reference's
    ``ref_logps`` and, with ``old_logps=True``, the sampling policy's (N, L)."""
    stop = stop_id(tokenizer)
    rows = [e for e in examples for _ in range(group_size)]
    prompts = [prompt_ids(tokenizer, e.instruction, e.input) for e in rows]
    batch = sample_completions(policy, prompts, max_new_tokens, temperature, stop,
                               generator)  # fmt: skip
    texts = completion_texts(tokenizer, batch, stop)
    rewards = [reward_fn(e, t) for e, t in zip(rows, texts, strict=True)]
    batch["rewards"] = torch.tensor(rewards, dtype=torch.float32)
    groups = batch["rewards"].view(-1, group_size)
    batch["advantages"] = group_advantages(groups).flatten()
    device = next(policy.parameters()).device
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    inputs = [batch[k].to(device) for k in keys]
    with torch.no_grad(), evaluating(policy):  # as sampled: no dropout
        batch["ref_logps"] = completion_logprobs(reference, *inputs, temperature)
        if old_logps:
            batch["old_logps"] = completion_logprobs(policy, *inputs, temperature)
    return batch


def grpo_batches(
    examples: Sequence[Example],
    prompts_per_step: int,
    make_batch: Callable[[list[Example]], dict[str, torch.Tensor]],
    num_iterations: int = 1,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """``make_batch`` (a ``rollout``) of ``prompts_per_step`` examples, forever (a
    seeded shuffle per epoch). Each batch is made when the loop asks for it, so it
    is sampled from the policy as trained so far; with ``num_iterations`` > 1 it is
    yielded that many times (it then needs ``old_logps``: clipping acts).
    """
    if len(examples) < prompts_per_step:
        raise ValueError(f"{len(examples)} examples cannot fill {prompts_per_step}")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - prompts_per_step + 1, prompts_per_step):
            batch = make_batch([examples[j] for j in order[i : i + prompts_per_step]])
            for _ in range(num_iterations):
                yield batch


def grpo_step(
    epsilon: float = 0.2,
    beta: float = 0.04,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    temperature: float = 1.0,
    unbiased_kl: bool = True,
) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]:
    """A ``loss_fn(model, batch)`` for ``shared.train.train_on_batches``; it logs
    ``reward``, ``kl``, ``clip_ratio``, ``ratio`` and ``completion_length``."""

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        logps = completion_logprobs(model, b["prompt_ids"], b["prompt_mask"],
                                    b["completion_ids"], b["completion_mask"],
                                    temperature)  # fmt: skip
        old = b["old_logps"] if "old_logps" in b else logps.detach()
        loss, metrics = grpo_loss(
            logps, old, b["ref_logps"], b["advantages"], b["completion_mask"],
            epsilon, beta, epsilon_high, loss_type, unbiased_kl,
        )  # fmt: skip
        metrics["reward"] = b["rewards"].mean()
        metrics["completion_length"] = b["completion_mask"].sum(1).float().mean()
        return loss, metrics

    return loss_fn


def grpo_train(
    policy: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainConfig,
    group_size: int = 8,
    prompts_per_step: int = 4,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    reward_fn: Reward = answer_reward,
    num_iterations: int = 1,
    unbiased_kl: bool = True,
    seed: int = 0,
    evaluate: Callable[[int, nn.Module], dict] | None = None,
    progress: bool = False,
) -> dict:
    """Train ``policy`` in place with GRPO for ``cfg.max_steps`` optimizer steps.

    Each step samples ``prompts_per_step`` x ``group_size`` completions from the
    current policy (``cfg.batch_size`` is not used); the reference is a frozen copy
    of the policy as it starts. Prompts are ``shared.chat.prompt_ids`` and
    completions end at ``shared.chat.stop_id``, so chat and text-template models
    both work. A completion cut off at ``max_new_tokens`` is scored as it stands,
    as evaluation scores it. Returns ``train_on_batches``' history: per step
    ``loss``, ``reward`` (mean), ``kl``, ``clip_ratio``, ``completion_length``...
    """
    context = policy.config.context_length
    lengths = [len(prompt_ids(tokenizer, e.instruction, e.input)) for e in examples]
    too_long = [n for n in lengths if n + max_new_tokens > context]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompts leave fewer than max_new_tokens={max_new_tokens}"
            f" tokens of the model's context ({context}): filter them out first"
        )
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    generator = torch.Generator(next(policy.parameters()).device).manual_seed(seed)
    make_batch = functools.partial(
        rollout, policy, reference, tokenizer, group_size=group_size,
        max_new_tokens=max_new_tokens, temperature=temperature, reward_fn=reward_fn,
        generator=generator, old_logps=num_iterations > 1,
    )  # fmt: skip
    batches = grpo_batches(examples, prompts_per_step, make_batch, num_iterations,
                           seed)  # fmt: skip
    loss_fn = grpo_step(epsilon, beta, epsilon_high, loss_type, temperature,
                        unbiased_kl)  # fmt: skip
    return train_on_batches(policy, batches, loss_fn, cfg, evaluate=evaluate,
                            progress=progress)  # fmt: skip


# ---------------------------------------------------------------------------- TRL


def trl_grpo_loss(
    hf_dir: str | Path,
    batch: dict[str, torch.Tensor],
    epsilon: float = 0.2,
    beta: float = 0.04,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    temperature: float = 1.0,
    unbiased_kl: bool = True,
) -> tuple[float, dict[str, torch.Tensor], dict[str, float | None]]:
    """TRL's ``GRPOTrainer`` loss on a fixed batch: (loss, gradients, TRL's metrics).

    Builds a trainer on the exported folder (``shared.hf_export.export_hf``) with a
    dummy reward and a two-row dataset, then calls its ``compute_loss`` on
    ``batch`` (keys as ``sample_completions`` makes them, plus ``advantages`` (N,),
    ``old_logps`` and ``ref_logps`` (N, L)) with the model in training mode and no
    gradient accumulation. The gradients are keyed by Hugging Face's parameter
    names (Conv1D weights are (in, out): the transpose of the course's); the metrics
    are TRL's ``kl`` and ``clip_ratio/region_mean``. Nothing is trained.

    Give prompts of one length: Hugging Face's GPT-2 numbers positions 0, 1, ...
    whatever the mask says, so TRL scores a left-padded prompt's tokens at shifted
    positions, where ``completion_logprobs`` starts each row at 0.
    """
    if not torch.cuda.is_available():  # DeepSpeed, imported by accelerate, would warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def no_reward(completions, **kwargs) -> list[float]:
        return [0.0] * len(completions)

    n_new = batch["completion_ids"].size(1)
    with tempfile.TemporaryDirectory() as scratch:
        args = GRPOConfig(
            output_dir=scratch, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
            loss_type=loss_type, temperature=temperature,
            use_bias_correction_kl=unbiased_kl, max_completion_length=n_new,
            num_generations=2, per_device_train_batch_size=2,
            # TRL's defaults are for big models on GPUs
            bf16=False, gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(), report_to="none",
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(hf_dir), reward_funcs=no_reward,
            args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 2),
            processing_class=AutoTokenizer.from_pretrained(hf_dir),
        )  # fmt: skip
    model = trainer.model
    device = next(model.parameters()).device
    mask = batch["completion_mask"]
    inputs = {
        "prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
        "completion_ids": batch["completion_ids"], "completion_mask": mask,
        "advantages": batch["advantages"], "old_per_token_logps": batch["old_logps"],
        "ref_per_token_logps": batch["ref_logps"], "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    inputs = {k: v.to(device) for k, v in inputs.items()}
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()
             if p.grad is not None}  # fmt: skip
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    metrics = {"clip_ratio": logged["clip_ratio/region_mean"], "kl": logged.get("kl")}
    return loss.item(), grads, metrics
