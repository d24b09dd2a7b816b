"""Speculative decoding: a small *draft* model guesses ``k`` tokens, the large
*target* model checks all of them in one forward pass, and a rejection-sampling rule
keeps exactly the target's distribution (Leviathan, Kalman and Matias 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling").

Why it can pay: one decoding step of a large model on one token costs about as much
as a step on ``k + 1`` tokens (the weights are read once either way), so if the
draft's guesses are often right, each expensive target pass yields several tokens.

One round, with the sequence ``x_1 .. x_n`` so far:

1. the draft samples ``d_1 .. d_k`` one at a time from its distributions ``q_i``;
2. the target runs ``x_n, d_1 .. d_k`` in one pass through its KV cache and so gets
   its distributions ``p_1 .. p_{k+1}`` for every drafted position and one more;
3. ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``, left to
   right; at the first rejection the replacement is sampled from
   ``norm(max(0, p_i - q_i))`` and the round ends; if all ``k`` are accepted a bonus
   token is sampled from ``p_{k+1}``;
4. both KV caches forget the rejected positions (``KVCache.truncate``).

Every round emits at least one token, and each emitted token has exactly the
target's distribution, whatever the draft: accepting ``x`` has probability
``min(q(x), p(x))`` and the residual supplies the missing ``max(0, p(x) - q(x))``.
Greedy decoding (``temperature=0``) is the special case in which ``p`` and ``q`` are
one-hot: a drafted token is kept while it equals the target's argmax, and the
output is token for token that of ``generate(target, ..., temperature=0)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from shared.generation.cache import KVCache
from shared.generation.sampling import next_token_distribution
from shared.model import evaluating


@dataclass
class SpeculativeStats:
    """What a speculative run did; ``alpha`` is the per-token acceptance estimate."""

    new_tokens: int = 0
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of those, kept
    rejected: int = 0  # rounds that ended at a rejected draft token
    target_passes: int = 0  # one per round (the first also reads the prompt)
    draft_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed: the share of the draft's work that was kept."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def alpha(self) -> float:
        """Accepted / tested. Tokens after a rejection are never tested, so this,
        not ``acceptance_rate``, estimates the per-token acceptance probability
        of Leviathan et al.'s formulas (the rate of a geometric variable)."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else float("nan")

    @property
    def tokens_per_target_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {
            "acceptance_rate": self.acceptance_rate,
            "alpha": self.alpha,
            "tokens_per_target_pass": self.tokens_per_target_pass,
        }


# ------------------------------------------------------- the cost model (Leviathan)


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """Mean tokens one round emits if each draft token is accepted independently
    with probability ``alpha``: 1 + alpha + ... + alpha^k = (1 - a^(k+1)) / (1 - a)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected speed-up over plain decoding: tokens per round
    over the round's cost, ``k`` draft steps at ``cost_ratio`` = draft step /
    target step plus one target pass (assumed to cost one target step)."""
    return expected_tokens_per_pass(alpha, k) / (k * cost_ratio + 1.0)


def acceptance_probability(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Per position (..., V) -> (...): the chance the draft's token is accepted,
    sum_x min(p(x), q(x)) = 1 - total variation(p, q) (Leviathan et al., sec. 3.1);
    greedy (``temperature=0``): 1 where both argmaxes agree, else 0. Averaged over
    text it estimates ``alpha`` without running the decoding loop."""
    vocab = target_logits.size(-1)
    p, q = (
        next_token_distribution(x.reshape(-1, vocab), temperature, top_k, top_p)
        for x in (target_logits, draft_logits)
    )
    return torch.minimum(p, q).sum(-1).view(target_logits.shape[:-1])


def break_even_cost_ratio(alpha: float, k: int) -> float:
    """The draft/target cost ratio at which speculative decoding is as fast as
    plain decoding (``expected_speedup == 1``); a cheaper draft makes it pay."""
    if k == 0:
        return float("inf")
    return (expected_tokens_per_pass(alpha, k) - 1.0) / k


# ------------------------------------------------------------ the acceptance rule


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from the (unnormalised) probabilities of one row."""
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()  # a CPU generator keeps runs reproducible across devices
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_draft(
    p: torch.Tensor,
    q: torch.Tensor | None,
    proposal: list[int],
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> list[int]:
    """The tokens a round emits: the accepted prefix of ``proposal`` plus one token
    from the target (the replacement of the first rejected one, or the bonus).

    ``p`` (k + 1, V): the target's distributions at each drafted position and one
    more; ``q`` (k, V): the draft's distributions the proposal was sampled from.
    ``greedy``: keep a token while it is the target's argmax (no randomness; ``p``
    may then be logits and ``q`` is not used).
    """
    for i, token in enumerate(proposal):
        if greedy:
            best = int(p[i].argmax())
            if token != best:
                return proposal[:i] + [best]
            continue
        device = generator.device if generator is not None else "cpu"
        u = float(torch.rand((), generator=generator, device=device))
        if u * float(q[i, token]) < float(p[i, token]):  # prob. min(1, p/q)
            continue
        # the target's mass the draft under-proposed; positive since p(token) < q(token)
        residual = (p[i] - q[i]).clamp_min(0.0)
        return proposal[:i] + [_draw(residual / residual.sum(), generator)]
    last = p[len(proposal)]
    return proposal + [int(last.argmax()) if greedy else _draw(last, generator)]


# ----------------------------------------------------------------------- the loop


def _check(target: nn.Module, draft: nn.Module, idx: torch.Tensor, new: int, k: int):
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(
            f"speculative_generate decodes one sequence: idx must be (1, T), got "
            f"shape {tuple(idx.shape)} (loop over the rows of a batch)"
        )
    if idx.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if k < 1 or new < 0:
        raise ValueError(f"need k >= 1 and max_new_tokens >= 0, got {k}, {new}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"target and draft must share a tokenizer: vocabularies of "
            f"{target.config.vocab_size} and {draft.config.vocab_size} ids"
        )
    window = min(target.config.context_length, draft.config.context_length)
    if new > 0 and idx.size(1) + new - 1 > window:
        raise ValueError(
            f"prompt ({idx.size(1)} tokens) + max_new_tokens ({new}) - 1 exceeds the "
            f"context window ({window}) that both KV caches must hold; shorten the "
            "prompt or use generate(), which slides the window"
        )


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SpeculativeStats]:
    """Extend ``idx`` (1, T) by up to ``max_new_tokens`` tokens of ``target``,
    ``k`` draft tokens checked per target pass; returns (1, T + n) (and the
    ``SpeculativeStats`` with ``return_stats``).

    The tokens follow the target's distribution under ``temperature``, ``top_k``
    and ``top_p`` (the same transform as ``generate``, applied to both models);
    greedy (``temperature=0``, the default) gives ``generate``'s very tokens. Both
    models must share the vocabulary, and the prompt and the new tokens must fit
    both context windows (a ``ValueError`` otherwise: there is no sliding window).
    Generation stops after ``eos_id``. One sequence at a time (batch size 1).
    """
    _check(target, draft, idx, max_new_tokens, k)
    stats = SpeculativeStats()
    greedy = temperature == 0
    tokens, total = idx[0].tolist(), idx.size(1) + max_new_tokens
    # the last token is never fed back, so the caches need total - 1 positions
    t_cache = KVCache(target.config.n_layer, max(total - 1, 1))
    d_cache = KVCache(draft.config.n_layer, max(total - 1, 1))

    def distribution(logits: torch.Tensor) -> torch.Tensor:  # (rows, V) -> probs
        return next_token_distribution(logits, temperature, top_k, top_p)

    def run(model: nn.Module, cache: KVCache, ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids], device=idx.device), kv_cache=cache)[0]

    with evaluating(target), evaluating(draft):
        while len(tokens) < total:
            n = len(tokens)
            k_now = min(k, total - n - 1)  # never draft past max_new_tokens
            # 1. the draft proposes k_now tokens; it first reads what it has not
            # seen (the prompt, then 1 token, or 2 after a round kept everything)
            proposal, q_rows, fresh = [], [], tokens[d_cache.length :]
            for _ in range(k_now):
                logits = run(draft, d_cache, fresh)[-1:]
                if greedy:  # the argmax; no distribution needed
                    proposal.append(int(logits.argmax()))
                else:
                    q_rows.append(distribution(logits)[0])
                    proposal.append(_draw(q_rows[-1], generator))
                fresh = proposal[-1:]
            stats.draft_passes += k_now
            # 2. one target pass scores every proposed token and one more
            logits = run(target, t_cache, tokens[t_cache.length :] + proposal)
            p = logits[-(k_now + 1) :]
            stats.target_passes += 1
            # 3. accept or resample
            q = None
            if not greedy:
                p = distribution(p)
                q = torch.stack(q_rows) if q_rows else p[:0]
            emitted = verify_draft(p, q, proposal, generator, greedy)
            kept = len(emitted) - 1
            stats.proposed += k_now
            stats.accepted += kept
            stats.rejected += int(kept < k_now)
            if eos_id is not None and eos_id in emitted:
                emitted = emitted[: emitted.index(eos_id) + 1]
            tokens += emitted
            if eos_id is not None and tokens[-1] == eos_id:
                break
            # 4. forget the rejected positions: both caches hold at most the
            # sequence but its last token, which the next round feeds
            t_cache.truncate(len(tokens) - 1)
            d_cache.truncate(min(d_cache.length, len(tokens) - 1))
    stats.new_tokens = len(tokens) - idx.size(1)
    out = torch.tensor([tokens], dtype=idx.dtype, device=idx.device)
    return (out, stats) if return_stats else out
