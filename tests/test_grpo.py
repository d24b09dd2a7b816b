"""GRPO (``shared.grpo``): group advantages, the clipped loss and its KL term, the
sampler's stop handling, equality with TRL's ``GRPOTrainer`` loss and gradients, and
a short training run that raises a toy reward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared import grpo, tasks
from shared.chat import prompt_ids, stop_id
from shared.gpt2_weights import CONV1D_WEIGHTS
from shared.hf_export import export_hf
from shared.model import GPT, GPTConfig
from shared.pretrained import LAPTOP_MODEL_DIR
from shared.tokenizer import BPETokenizer
from shared.train import TrainConfig


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.load(LAPTOP_MODEL_DIR / "tokenizer.json")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=1024, context_length=128, n_layer=2, n_head=2,
                       n_embd=16)  # fmt: skip
    return GPT(config).eval()


# ---------------------------------------------------------------------- advantages


def test_group_advantages_are_standardised_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.4, 0.5],
                            [1.0, 1.0, 1.0, 1.0]])  # fmt: skip
    adv = grpo.group_advantages(rewards)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    # by hand: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(adv[0], expected)
    assert adv[1].std() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(adv[2], torch.zeros(4))  # all equal: nothing to learn
    unscaled = grpo.group_advantages(rewards, scale=False)
    torch.testing.assert_close(unscaled[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="G >= 2"):
        grpo.group_advantages(torch.ones(3, 1))


# ---------------------------------------------------------------------- the loss


def test_clipped_tokens_get_no_gradient():
    # ratios above, below and inside [1 - eps, 1 + eps] = [0.8, 1.2]
    ratios = torch.tensor([[1.5, 0.5, 1.1]])
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    # a positive advantage is clipped above 1 + eps, a negative one below 1 - eps
    for a, cut in ((1.0, [True, False, False]), (-1.0, [False, True, False])):
        logps = ratios.log().requires_grad_(True)
        loss, metrics = grpo.grpo_loss(logps, old, old, torch.tensor([a]), mask,
                                       epsilon=0.2, beta=0.0)  # fmt: skip
        loss.backward()
        cut = torch.tensor(cut)
        assert torch.all(logps.grad[0, cut] == 0)
        # elsewhere d/dlogp of -ratio * A / 3 is -A * ratio / 3
        torch.testing.assert_close(logps.grad[0, ~cut], -a * ratios[0, ~cut] / 3)
        assert metrics["clip_ratio"] == pytest.approx(1 / 3)
    # a wider upper bound (DAPO's epsilon_high) lets the ratio 1.5 through
    logps = ratios.log().requires_grad_(True)
    loss, _ = grpo.grpo_loss(logps, old, old, torch.tensor([1.0]), mask, epsilon=0.2,
                             beta=0.0, epsilon_high=0.6)  # fmt: skip
    loss.backward()
    assert logps.grad[0, 0] != 0


def test_on_policy_gradient_is_advantage_over_length():
    # old = logps detached: the ratio is 1, its gradient A per token (grpo: / length)
    logps = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    logps.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    for loss_type, per_row in (("grpo", mask.sum(1) * 3), ("dapo", mask.sum())):
        logps.grad = None
        loss, m = grpo.grpo_loss(logps, logps.detach(), logps.detach(), adv, mask,
                                 beta=0.0, loss_type=loss_type)  # fmt: skip
        loss.backward()
        expected = -adv[:, None] / per_row.reshape(-1, 1) * mask
        torch.testing.assert_close(logps.grad, expected.float())
        assert m["ratio"] == 1 and m["clip_ratio"] == 0 and m["kl"] == 0


def test_beta_zero_removes_the_kl_term():
    g = torch.Generator().manual_seed(1)
    logps, old = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ref = torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    adv = torch.randn(4, generator=g)

    def loss(beta, ref_logps, unbiased=False):
        return grpo.grpo_loss(logps, old, ref_logps, adv, mask, beta=beta,
                              unbiased_kl=unbiased)[0]  # fmt: skip

    assert loss(0.0, ref) == loss(0.0, ref + 5)  # the reference is ignored
    # beta > 0 adds beta times k3, each row's mean, then the mean of the rows
    k3 = torch.exp(ref - logps) - (ref - logps) - 1
    per_row = (k3 * mask).sum(1) / mask.sum(1).clamp(min=1)
    torch.testing.assert_close(loss(0.1, ref) - loss(0.0, ref), 0.1 * per_row.mean())
    # unbiased_kl weights each token's k3 by its ratio
    weighted = k3 * torch.exp(logps - old)
    per_row = (weighted * mask).sum(1) / mask.sum(1).clamp(min=1)
    diff = loss(0.1, ref, True) - loss(0.0, ref)
    torch.testing.assert_close(diff, 0.1 * per_row.mean())


def test_kl_gradients_on_policy():
    # k3 alone pushes with 1 - ref/pi; weighted by the ratio, with logp - ref
    g = torch.Generator().manual_seed(2)
    logps = torch.randn(2, 3, generator=g).requires_grad_(True)
    ref = torch.randn(2, 3, generator=g)
    mask, zero = torch.ones(2, 3), torch.zeros(2)
    for unbiased, expected in ((False, 1 - torch.exp(ref - logps.detach())),
                               (True, logps.detach() - ref)):  # fmt: skip
        logps.grad = None
        loss, _ = grpo.grpo_loss(logps, logps.detach(), ref, zero, mask, beta=0.5,
                                 loss_type="dapo", unbiased_kl=unbiased)  # fmt: skip
        loss.backward()
        torch.testing.assert_close(logps.grad, 0.5 * expected / 6)


def test_grpo_loss_refuses_unknown_loss_types():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo.grpo_loss(x, x, x, torch.zeros(1), x, loss_type="dr_grpo")


# ---------------------------------------------------------------------- sampling


class Bigram(nn.Module):
    """Logits from the last token alone: a table we can read the answer from."""

    def __init__(self, vocab: int = 12, context_length: int = 40) -> None:
        super().__init__()
        self.config = GPTConfig(vocab, context_length, 1, 1, 4)
        self.table = nn.Parameter(torch.randn(vocab, vocab) / 2)

    def forward(self, idx, attention_mask=None, position_ids=None):
        return self.table[idx]


def test_sampling_stops_at_stop_id_and_masks_after_it():
    model, stop = Bigram(), 3
    with torch.no_grad():
        model.table[:, stop] = 0.0  # stopping is neither rare nor certain
    gen = torch.Generator().manual_seed(0)
    ids, mask = grpo.sample_group(model, [5, 7, 1], 64, 12, stop_id=stop,
                                  generator=gen)  # fmt: skip
    assert ids.shape == mask.shape and ids.size(0) == 64 and ids.size(1) <= 12
    lengths = mask.sum(1)
    assert lengths.min() < ids.size(1) and lengths.max() > 1  # both kinds of rows
    for row, n in zip(ids.tolist(), lengths.tolist(), strict=True):
        kept = row[:n]
        assert stop not in kept[:-1]  # nothing after a first stop is kept
        if n < len(row):  # stopped early: the stop is kept, then only padding
            assert kept[-1] == stop and set(row[n:]) == {stop}
    assert torch.equal(mask, (torch.arange(ids.size(1)) < lengths[:, None]).long())


def test_sampling_follows_the_softmax_at_the_temperature():
    model = Bigram()
    gen = torch.Generator().manual_seed(0)
    ids, _ = grpo.sample_group(model, [4], 20000, 1, temperature=2.0, generator=gen)
    counts = torch.bincount(ids[:, 0], minlength=12).float() / 20000
    expected = torch.softmax(model.table[4].detach() / 2.0, -1)
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="room"):
        grpo.sample_group(model, [1] * 35, 2, 10)


def test_completion_logprobs_of_a_left_padded_row_equal_it_alone():
    model = tiny_gpt()
    gen = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    batch = grpo.sample_completions(model, prompts, 6, generator=gen)
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    both = grpo.completion_logprobs(model, *(batch[k] for k in keys))
    for row, p in enumerate(prompts):
        ids = torch.tensor([p + batch["completion_ids"][row].tolist()])
        alone = torch.log_softmax(model(ids)[0, len(p) - 1 : -1], -1)
        picked = alone.gather(-1, ids[0, len(p) :, None])[:, 0]
        torch.testing.assert_close(both[row], picked, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def trl_case(tok, tmp_path_factory):
    """A tiny GPT, its Hugging Face export, and a fixed batch: two prompts of one
    length (Hugging Face's GPT-2 ignores left padding when it numbers positions),
    three completions each, of 1 to 8 tokens."""
    model = tiny_gpt()
    folder = export_hf(model, tok, tmp_path_factory.mktemp("grpo_hf"))
    by_length: dict[int, list[list[int]]] = {}
    for e in tasks.load_examples("test"):
        ids = prompt_ids(tok, e.instruction, e.input)
        by_length.setdefault(len(ids), []).append(ids)
    pair = next(p for p in by_length.values() if len(p) >= 2)[:2]
    gen = torch.Generator().manual_seed(0)
    batch = grpo.sample_completions(model, [p for p in pair for _ in range(3)], 8,
                                    generator=gen)  # fmt: skip
    lengths = torch.tensor([8, 3, 6, 1, 8, 5])
    batch["completion_mask"] = (torch.arange(8) < lengths[:, None]).long()
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    with torch.no_grad():
        logps = grpo.completion_logprobs(model, *(batch[k] for k in keys))
    batch["old_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    batch["ref_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=gen)
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    batch["advantages"] = grpo.group_advantages(rewards).flatten()
    return model, folder, batch


# unbiased_kl=True is TRL's default (use_bias_correction_kl)
SETTINGS = {
    "grpo": dict(loss_type="grpo", beta=0.04, epsilon_high=None, unbiased_kl=True),
    "dapo": dict(
        loss_type="dapo",
        beta=0.1,
        epsilon_high=0.28,
        unbiased_kl=False,
        temperature=0.7,
    ),  # fmt: skip
    "no-kl": dict(loss_type="grpo", beta=0.0, epsilon_high=0.3, unbiased_kl=False),
}


@pytest.mark.parametrize("case", SETTINGS)
def test_loss_and_gradients_equal_trl(trl_case, case):
    model, folder, batch = trl_case
    settings = {"epsilon": 0.2, "temperature": 1.0} | SETTINGS[case]
    trl_loss, trl_grads, trl_metrics = grpo.trl_grpo_loss(folder, batch, **settings)

    model.zero_grad()
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    temperature = settings.pop("temperature")
    logps = grpo.completion_logprobs(model, *(batch[k] for k in keys), temperature)
    loss, metrics = grpo.grpo_loss(
        logps, batch["old_logps"], batch["ref_logps"], batch["advantages"],
        batch["completion_mask"], **settings,
    )  # fmt: skip
    loss.backward()
    assert metrics["clip_ratio"] > 0  # the perturbed old log-probs make clipping act
    assert abs(loss.item() - trl_loss) <= 1e-5
    assert metrics["clip_ratio"].item() == pytest.approx(trl_metrics["clip_ratio"])
    if settings["beta"]:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    ours = dict(model.named_parameters())
    assert len(trl_grads) == len(ours)
    for name, grad in trl_grads.items():
        mine = ours[name].grad
        mine = mine.t() if name.endswith(CONV1D_WEIGHTS) else mine
        torch.testing.assert_close(mine, grad, atol=1e-5, rtol=0, msg=name)


# ---------------------------------------------------------------------- training


def test_batches_are_made_lazily_and_reused_num_iterations_times():
    made = []

    def make_batch(examples):
        made.append(examples)
        return {"n": len(made)}

    batches = grpo.grpo_batches(list(range(5)), 2, make_batch, num_iterations=3)
    assert made == []  # nothing sampled before the loop asks
    got = [next(batches)["n"] for _ in range(7)]
    assert got == [1, 1, 1, 2, 2, 2, 3] and len(made) == 3
    assert all(len(m) == 2 for m in made)
    with pytest.raises(ValueError, match="cannot fill"):
        next(grpo.grpo_batches([1], 2, make_batch))


def share_of_e(example, response: str) -> float:
    """A toy reward a random model can climb: the share of 'e' in the response."""
    return response.count("e") / max(1, len(response))


def test_grpo_train_raises_a_toy_reward(tok):
    policy = tiny_gpt(seed=1)
    examples = tasks.load_examples("train")[:40]
    probe = [prompt_ids(tok, e.instruction, e.input) for e in examples[:8]]

    def evaluate(step, model):
        gen = torch.Generator().manual_seed(123)  # the same draws at every probe
        batch = grpo.sample_completions(model, probe * 8, 8, 1.0, stop_id(tok), gen)
        texts = grpo.completion_texts(tok, batch, stop_id(tok))
        return {"probe_reward": sum(share_of_e(None, t) for t in texts) / len(texts)}

    cfg = TrainConfig(max_steps=30, lr=3e-2, min_lr=3e-3, warmup_steps=0,
                      weight_decay=0.0, eval_interval=30, seed=0)  # fmt: skip
    history = grpo.grpo_train(policy, tok, examples, cfg, group_size=8,
                              prompts_per_step=2, beta=0.04, max_new_tokens=8,
                              reward_fn=share_of_e, evaluate=evaluate)  # fmt: skip
    steps = history["train"]
    assert len(steps) == 30
    for key in ("reward", "kl", "clip_ratio", "completion_length", "loss"):
        assert all(key in s for s in steps), key
    assert steps[0]["kl"] == 0  # the policy starts as the reference
    assert steps[-1]["kl"] > 0
    before, after = (e["probe_reward"] for e in history["eval"])
    assert after > before + 0.03, (before, after)  # measured: 0.088 -> 0.142


def test_num_iterations_reuses_the_batch_with_old_logps(tok):
    policy = tiny_gpt(seed=2)
    examples = tasks.load_examples("train")[:8]
    cfg = TrainConfig(max_steps=2, lr=5e-2, warmup_steps=0, eval_interval=100)
    history = grpo.grpo_train(policy, tok, examples, cfg, group_size=4,
                              prompts_per_step=2, max_new_tokens=4,
                              reward_fn=share_of_e, num_iterations=2)  # fmt: skip
    first, second = history["train"]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)  # sampled by this policy
    assert second["ratio"] != pytest.approx(1.0, abs=1e-4)  # one step later
    assert first["reward"] == second["reward"]  # the same completions


def test_grpo_train_refuses_prompts_without_room(tok):
    examples = tasks.load_examples("train")[:4]
    with pytest.raises(ValueError, match="filter them out"):
        grpo.grpo_train(tiny_gpt(), tok, examples, TrainConfig(max_steps=1),
                        max_new_tokens=100)  # fmt: skip
