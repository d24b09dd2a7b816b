"""Train the draft model for speculative decoding of the course model.

    python chapters/09_inference/train_draft.py [--quick] [--no-sweep] [--no-ce]

The draft is a much smaller GPT with the course model's tokenizer, trained on the
Tiny Shakespeare training split (``shakespeare_splits``, as in chapter 04) by
*distillation*: the loss is the KL divergence from the target's next-token
distribution to the draft's (Hinton, Vinyals and Dean 2015), which is what
speculative decoding rewards, since a drafted token is accepted with probability
``sum_x min(p(x), q(x)) = 1 - TV(p, q)`` (``acceptance_probability``).

1. *Sweep*: a few draft shapes (and one that starts as the target's embeddings and
   first block, the target with layers skipped, as in Zhang et al. 2023's
   self-speculative decoding), each trained briefly, then measured: the cost of a
   decode step relative to the target's (``c``, process CPU time) and the
   acceptance on held-out text (teacher-forced, greedy); the candidate with the
   best predicted greedy speed-up (Leviathan et al.'s formula, best ``k``) is kept.
2. *Main run*: that candidate, trained longer by distillation, shipped to
   ``data/models/shakespeare-draft/`` (``load_course_model(name="draft")``).
3. *Control*: the same candidate, steps and seed with plain next-token
   cross-entropy.

All on one thread, seeded. Writes ``results/draft_training.json``: settings, minutes,
held-out loss and bits per character, acceptance (teacher-forced and in real
speculative runs), step costs. The machine is shared: timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.dataset import BatchSampler
from shared.device import seed_everything
from shared.generation import (
    acceptance_probability,
    break_even_cost_ratio,
    expected_speedup,
)
from shared.loss import bits_per_char, evaluate_split
from shared.model import GPT, GPTConfig
from shared.pretrained import (
    LAPTOP_MODEL_DIR,
    MODELS_DIR,
    as_ids,
    load_course_model,
    save_course_model,
    shakespeare_splits,
    weights_sha256,
)
from shared.train import TrainConfig, train_on_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import machine, pass_ms, run_all, val_prompts  # noqa: E402

HERE = Path(__file__).resolve().parent
DRAFT_DIR = MODELS_DIR / "shakespeare-draft"
# name -> ((n_layer, n_head, n_embd), start from the target's weights?)
CANDIDATES = {
    "1 layer, 64 wide": ((1, 2, 64), False),
    "1 layer, 128 wide": ((1, 4, 128), False),
    "2 layers, 128 wide": ((2, 4, 128), False),
    "target's block 1, 192 wide": ((1, 6, 192), True),
}
SEED = 1337


def make_draft(target: GPT, name: str) -> GPT:
    """A fresh draft; "from the target": its embeddings, first blocks and head."""
    (n_layer, n_head, n_embd), from_target = CANDIDATES[name]
    c = target.config
    draft = GPT(GPTConfig(c.vocab_size, c.context_length, n_layer, n_head, n_embd))
    if from_target:
        kept = tuple(f"transformer.h.{i}." for i in range(n_layer))
        state = {
            key: value
            for key, value in target.state_dict().items()
            if not key.startswith("transformer.h.") or key.startswith(kept)
        }
        draft.load_state_dict(state)
    return draft


def train_draft(target, name, train_ids, steps: int, loss: str, batch: int) -> tuple:
    """Candidate ``name`` trained for ``steps``; ``loss`` "distill" or "ce"."""
    seed_everything(SEED)
    draft = make_draft(target, name)
    cfg = TrainConfig(
        max_steps=steps, batch_size=batch, lr=2e-3, min_lr=2e-4,
        warmup_steps=min(100, steps // 10), eval_interval=10**9, seed=SEED,
    )  # fmt: skip
    sampler = BatchSampler(train_ids, batch, target.config.context_length, SEED)
    batches = iter(sampler.next, None)

    def loss_fn(model, xy):
        x, y = xy
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if loss == "ce":
            return ce
        with torch.no_grad():
            teacher = target(x).log_softmax(-1).flatten(0, 1)
        # KL(p_target || q_draft), averaged over the tokens of the batch
        kl = F.kl_div(
            logits.log_softmax(-1).flatten(0, 1), teacher, log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        return kl, {"ce": ce.detach()}

    start = time.perf_counter()
    history = train_on_batches(draft, batches, loss_fn, cfg, progress=False)
    minutes = (time.perf_counter() - start) / 60
    draft.eval()
    return draft, cfg, minutes, history["train"][-1]


@torch.no_grad()
def teacher_forced_acceptance(target, draft, val_ids, max_tokens: int) -> dict:
    """Mean ``sum_x min(p, q)`` over held-out positions (greedy: argmax agreement)."""
    T = target.config.context_length
    ids = torch.as_tensor(as_ids(val_ids))[: max_tokens // T * T].view(-1, T)
    sums = dict.fromkeys(("greedy", "t0.8", "t1.0"), 0.0)
    for x in ids.split(32):
        p_logits, q_logits = target(x), draft(x)
        for name, temp in (("greedy", 0.0), ("t0.8", 0.8), ("t1.0", 1.0)):
            sums[name] += float(acceptance_probability(p_logits, q_logits, temp).sum())
    return {name: s / ids.numel() for name, s in sums.items()}


def measure(target, draft, data, prompts, max_tokens: int, new: int) -> dict:
    """Held-out loss, acceptance and step-cost ratio of a trained draft."""
    val_ids = as_ids(data["val_ids"])
    nats = evaluate_split(draft, val_ids, max_tokens=max_tokens)
    n_tokens = min(max_tokens, len(val_ids))  # chapter 04's convention
    chars = data["val_chars"] * n_tokens / len(val_ids)  # a prefix: its share
    tf = teacher_forced_acceptance(target, draft, val_ids, max_tokens)
    # interleaved; CPU time, which other jobs on the machine disturb less
    steps = [(pass_ms(target)["cpu"], pass_ms(draft)["cpu"]) for _ in range(3)]
    c = sorted(d / t for t, d in steps)[1]
    best = max(range(1, 7), key=lambda k: expected_speedup(tf["greedy"], k, c))
    out = {
        "params": draft.num_parameters(),
        "val_nats_per_token": nats,
        "val_bits_per_char": bits_per_char(nats, n_tokens, chars),
        "val_tokens_evaluated": n_tokens,
        "teacher_forced_acceptance": tf,
        "cost_ratio_c": c,
        "best_k_greedy": best,
        "predicted_speedup_greedy": expected_speedup(tf["greedy"], best, c),
        "break_even_c_greedy": break_even_cost_ratio(tf["greedy"], best),
    }
    if prompts:  # acceptance inside the real loop, k = 4
        for mode, temp in (("greedy", 0.0), ("t0.8", 0.8)):
            _, s = run_all(target, draft, prompts, new, 4, temp)
            out[f"speculative_k4_{mode}"] = {
                key: s.as_dict()[key]
                for key in ("alpha", "acceptance_rate", "tokens_per_target_pass")
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--sweep-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--candidate", choices=CANDIDATES, help="skip the sweep")
    parser.add_argument("--no-ce", action="store_true", help="skip the CE control")
    parser.add_argument("--out", type=Path, help=f"model folder (default {DRAFT_DIR})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.sweep_steps, args.batch = 20, 10, 4
    t0 = time.perf_counter()
    target, tok, _ = load_course_model("cpu")
    data = shakespeare_splits(tok)
    train_ids = as_ids(data["train_ids"])
    eval_tokens = 2048 if args.quick else 16384
    prompts = val_prompts(data["val_ids"], 2 if args.quick else 10)
    new = 20 if args.quick else 100

    sweep, name = {}, args.candidate
    if name is None:
        for n in CANDIDATES:
            draft, *_ = train_draft(
                target, n, train_ids, args.sweep_steps, "distill", args.batch
            )
            sweep[n] = measure(target, draft, data, [], eval_tokens, new)
            print(f"sweep {n}: {json.dumps(sweep[n])}")
        name = max(sweep, key=lambda n: sweep[n]["predicted_speedup_greedy"])
    runs = {}
    for loss in ("distill",) if args.no_ce else ("distill", "ce"):
        draft, cfg, minutes, last = train_draft(
            target, name, train_ids, args.steps, loss, args.batch
        )
        runs[loss] = {"minutes": minutes, "last_train_step": last} | measure(
            target, draft, data, prompts, len(data["val_ids"]), new
        )
        print(f"{loss}: {json.dumps(runs[loss])}")
        if loss == "distill":
            shipped, train_cfg = draft, cfg
    info = {
        "name": "shakespeare-draft",
        "description": "Draft model for speculative decoding of shakespeare-laptop: "
        "a small GPT distilled from it on Tiny Shakespeare's training split; "
        "chapter 09 of the course.",
        "candidate": name,
        "initialised_from_target": CANDIDATES[name][1],
        "tokenizer": "the course model's (shakespeare-laptop/tokenizer.json)",
        "target": "shakespeare-laptop",
        "target_weights_sha256": weights_sha256(LAPTOP_MODEL_DIR),
        "loss": "KL(target || draft), temperature 1",
        "train_config": train_cfg.to_dict(),
        "results": runs["distill"],
    }
    out = args.out or (None if args.quick else DRAFT_DIR)
    if out is not None:
        save_course_model(shipped, tok, out, info)
        print(f"shipped the draft to {out}")
    result = {
        "settings": {
            "candidates": {
                n: {"n_layer_head_embd": list(shape), "from_target": f}
                for n, (shape, f) in CANDIDATES.items()
            },  # fmt: skip
            "sweep_steps": args.sweep_steps if sweep else 0,
            "chosen": name,
            "steps": args.steps,
            "batch_size": args.batch,
            "context_length": target.config.context_length,
            "train_config": train_cfg.to_dict(),
            "seed": SEED,
            "torch_threads": torch.get_num_threads(),
            "sweep_eval_tokens": eval_tokens,
            "speculative_prompts": len(prompts),
            "new_tokens": new,
            "quick": args.quick,
        },
        "sweep": sweep,
        "runs": runs,
        "target_params": target.num_parameters(),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "machine": machine(),
    }
    if not args.quick:
        path = HERE / "results" / "draft_training.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
