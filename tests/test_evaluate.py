"""Chapter 08's evaluation framework: intrinsic metrics, log-likelihood scoring (equal
to a direct computation with the Hugging Face export), multiple choice, intervals,
calibration, generation statistics and contamination checks."""

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from shared import evaluation as ev
from shared.data import REPO_ROOT
from shared.evaluate import main as evaluate_main
from shared.model import GPT, GPTConfig
from shared.pretrained import load_course_model


@dataclass
class _Cfg:
    vocab_size: int
    context_length: int


class Uniform(nn.Module):
    """Predicts every token with probability 1 / vocab_size."""

    def __init__(self, vocab_size: int = 50, context_length: int = 16):
        super().__init__()
        self.config = _Cfg(vocab_size, context_length)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.config.vocab_size) + 0 * self.dummy


@pytest.fixture(scope="module")
def small_gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def base():
    model, tokenizer, _ = load_course_model()
    return model, tokenizer


# ------------------------------------------------------------------ intrinsic


def test_uniform_predictor_perplexity_is_vocabulary_size():
    model = Uniform(vocab_size=50)
    ids = np.random.default_rng(0).integers(0, 50, 200)
    scores = ev.score_tokens(model, ids, stride=5)
    assert len(scores) == 199
    assert ev.perplexity(float(scores.loss.mean())) == pytest.approx(50, rel=1e-5)
    assert scores.confidence == pytest.approx(np.full(199, 1 / 50), rel=1e-5)


def test_bits_per_char_and_byte_by_hand():
    # 2 nats/token, 100 tokens over 300 characters: 200 nats = 288.54 bits / 300
    assert ev.bits_per_char(2.0, 100, 300) == pytest.approx(200 / math.log(2) / 300)
    assert ev.bits_per_char(math.log(2), 1, 1) == pytest.approx(1.0)
    text = "thou art ó"  # 10 characters, 11 UTF-8 bytes
    nats = 3.0 * 4  # 4 tokens at 3 nats each
    assert ev.bits_per_byte(3.0, 4, len(text.encode())) == pytest.approx(
        nats / math.log(2) / 11
    )


def test_stride_equal_to_window_matches_evaluate_split(small_gpt):
    ids = np.random.default_rng(1).integers(0, 64, 16 * 6 + 1)
    scores = ev.score_tokens(small_gpt, ids)
    assert float(scores.loss.mean()) == pytest.approx(
        ev.evaluate_split(small_gpt, ids), rel=1e-5
    )
    assert scores.context.min() == 1 and scores.context.max() == 16


@pytest.mark.parametrize("stride", [1, 3, 8, 16])
def test_every_token_scored_once_with_enough_context(small_gpt, stride):
    ids = np.random.default_rng(2).integers(0, 64, 70)
    scores = ev.score_tokens(small_gpt, ids, stride=stride, batch_size=4)
    assert len(scores) == 69
    assert (scores.context[16:] >= 16 - stride).all()
    # one token, directly: its window is the 16 ids before it at most
    t = 50
    ctx = int(scores.context[t])
    x = torch.as_tensor(ids[t + 1 - ctx : t + 1])[None]
    logp = torch.log_softmax(small_gpt(x)[0, -1], -1)
    assert scores.loss[t] == pytest.approx(-logp[ids[t + 1]].item(), abs=1e-5)


def test_bad_stride_raises(small_gpt):
    with pytest.raises(ValueError, match="stride"):
        ev.score_tokens(small_gpt, np.arange(40), stride=17)


# ------------------------------------------------------------ log-likelihood


def test_split_request_moves_trailing_whitespace(base):
    _, tok = base
    ctx, cont = ev.split_request(tok, "ROMEO:\n", "But soft!")
    assert tok.decode(cont) == "\nBut soft!"
    assert ctx + cont == tok.encode("ROMEO:\nBut soft!")
    ctx, cont = ev.split_request(tok, "", "But soft!")
    assert ctx == [tok.special_tokens["<|endoftext|>"]]


def test_loglikelihood_equals_hugging_face_export(base, tmp_path):
    from shared.hf_export import export_hf, load_hf

    model, tok = base
    export_hf(model, tok, tmp_path / "hf")
    hf, hf_tok = load_hf(tmp_path / "hf")
    requests = [
        ("ROMEO:\n", "But soft, what light"),
        ("First Citizen:\nWe are accounted poor citizens", ", the patricians good."),
        ("To be, or not to be: ", "that is the question"),
        ("", "JULIET:\nO Romeo, Romeo!"),
        ("### Response:\n", "JULIET<|endoftext|>"),  # the special token, as in HF
    ]
    ours = ev.loglikelihood(model, tok, requests, batch_size=3)
    for (context, continuation), (ll, _) in zip(requests, ours, strict=True):
        ctx, cont = ev.split_request(tok, context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        want = sum(logp[len(ctx) - 1 + i, c].item() for i, c in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-3)
        text = context + continuation
        assert hf_tok(text)["input_ids"] == tok.encode(text, allowed_special="all")


def test_is_greedy_and_left_truncation(base):
    from shared.generation import generate

    model, tok = base
    prompt = "KING RICHARD II:\n"
    ids = torch.tensor([tok.encode(prompt)])
    greedy = tok.decode(
        generate(model, ids, 8, temperature=0)[0, ids.size(1) :].tolist()
    )
    (ll_g, is_g), (_, is_r) = ev.loglikelihood(
        model, tok, [(prompt, greedy), (prompt, " zebra quantum")]
    )
    assert is_g and not is_r and ll_g < 0
    # a context longer than the window is cut from the left: only the last
    # context_length + 1 tokens of context + continuation enter the model
    long = "ROMEO:\n" + "And I will speak of love.\n" * 60
    ctx, cont = ev.split_request(tok, long, "And I")
    assert len(ctx) > 2 * model.config.context_length
    a = ev.loglikelihood(model, tok, [(long, "And I")])[0][0]
    x = torch.tensor([(ctx + cont)[-129:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0].float(), -1)
    want = sum(logp[128 - len(cont) + i, c].item() for i, c in enumerate(cont))
    assert a == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------ multiple choice


def test_acc_and_acc_norm_by_hand():
    items = [
        ev.MCItem("a", "t", "ctx", ["short", "a much longer choice"], 1),
        ev.MCItem("b", "t", "ctx", ["x", "yy", "zzz"], 0),
    ]
    # item a: summed -10 vs -12 -> acc picks 0; per character -2.0 vs -0.6 -> 1
    result = ev.MCResult(items, [[-10.0, -12.0], [-1.0, -3.0, -6.0]], [[0, 0], [0] * 3])
    assert result.pred.tolist() == [0, 0]
    assert result.pred_norm.tolist() == [1, 0]
    assert result.accuracy() == 0.5 and result.accuracy(norm=True) == 1.0
    assert ev.chance_accuracy(items) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_multiple_choice_picks_a_planted_answer(base):
    from shared.generation import generate

    model, tok = base
    items = []
    for k, prompt in enumerate(["ROMEO:\n", "JULIET:\n", "MENENIUS:\nWhat, "]):
        ids = torch.tensor([tok.encode(prompt)])
        out = generate(model, ids, 10, temperature=0)[0, ids.size(1) :].tolist()
        planted = tok.decode(out)  # what the model itself finds most likely
        choices = ["qzx vvk jjw pfft", planted, "Xylophone zebra quark", "1234 5678"]
        items.append(ev.MCItem(f"p{k}", "planted", prompt, choices, 1))
    result = ev.score_mc(model, tok, items)
    assert result.accuracy() == 1.0 and result.accuracy(norm=True) == 1.0


def test_course_tasks_are_reproducible_and_held_out():
    assert (
        subprocess.run(
            [sys.executable, "chapters/08_evaluation/make_tasks.py", "--check"],
            cwd=REPO_ROOT,
            capture_output=True,
        ).returncode
        == 0
    )
    held_out = set(ev.held_out_text().split("\n"))  # its lines
    for task in ev.MC_TASKS:
        items = ev.load_mc_items(task)
        assert len(items) >= 400
        assert len({i.id for i in items}) == len(items)
        labels = np.bincount([i.label for i in items], minlength=4)
        assert labels.min() > 0.8 * len(items) / 4  # answers spread over positions
        for item in items:
            assert 0 <= item.label < len(item.choices) == 4
            assert len(set(item.choices)) == 4
            # every line of context and answer is a line of the held-out text
            assert set(ev.item_text(item).split("\n")) - {""} <= held_out


@pytest.mark.parametrize(
    "label, choices, message",
    [
        (4, None, r"line 2: 'label' 4 is not a choice's index \(0 to 3\)"),
        (-1, None, r"line 2: 'label' -1 is not a choice's index"),
        (True, None, r"line 2: 'label' True is not a choice's index"),
        (0, ["only one"], r"line 2: 'choices' is not a list of at least two"),
        (None, None, r"speaker\.jsonl is empty"),
    ],
    ids=["label-4", "label-minus-1", "label-bool", "one-choice", "empty"],
)
def test_multiple_choice_files_name_the_file_and_the_line(
    tmp_path, label, choices, message
):
    good = ev.load_mc_items("speaker")[0]
    lines = []
    if label is not None:
        bad = dict(good.__dict__, label=label, choices=choices or good.choices)
        lines = [json.dumps(good.__dict__), json.dumps(bad)]
    (tmp_path / "speaker.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message) as refused:
        ev.load_mc_items("speaker", folder=tmp_path)
    assert str(tmp_path / "speaker.jsonl") in str(refused.value)


# ------------------------------------------------------------------ intervals


def test_bootstrap_interval_covers_mean_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    large = rng.random(5000) < 0.3
    lo, hi = ev.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = ev.bootstrap_ci(large)
    assert lo2 < 0.3 < hi2 and hi2 - lo2 < (hi - lo) / 5
    # binomial standard error: width of a 95% interval ~ 2 * 1.96 * sqrt(pq/n)
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 5000), rel=0.15)
    a = rng.random(400) < 0.6
    lo, hi = ev.paired_bootstrap_ci(a, np.zeros(400))
    assert lo < a.mean() < hi
    with pytest.raises(ValueError):
        ev.paired_bootstrap_ci(a, np.zeros(3))


def test_block_bootstrap_is_wider_for_correlated_values():
    rng = np.random.default_rng(0)
    blocks = np.repeat(rng.normal(size=200), 50)  # 50 equal values in a row
    lo, hi = ev.bootstrap_ci(blocks)
    blo, bhi = ev.block_bootstrap_ci(blocks, 50)
    assert bhi - blo > 4 * (hi - lo)


# ---------------------------------------------------------------- calibration


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    rng = np.random.default_rng(0)
    conf = rng.random(200_000)
    correct = rng.random(200_000) < conf  # right exactly as often as it says
    assert ev.expected_calibration_error(conf, correct) < 0.01
    # always 90% sure, right 60% of the time: ECE is the 0.3 gap
    over = ev.expected_calibration_error(np.full(1000, 0.9), np.arange(1000) % 10 < 6)
    assert over == pytest.approx(0.3)
    bins = ev.reliability(conf, correct, n_bins=10)
    assert bins["count"].sum() == 200_000
    assert np.abs(bins["accuracy"] - bins["confidence"]).max() < 0.02


# ------------------------------------------------------- generation statistics


def test_generation_statistics_by_hand():
    assert ev.distinct_n(["a b a b"], 1) == 0.5
    assert ev.distinct_n(["a b c", "a b d"], 2) == 0.75  # ab bc ab bd
    assert ev.repetition_rate("to be or not to be or not", 2) == pytest.approx(3 / 7)
    assert ev.repetition_rate("one two three", 4) == 0.0
    stats = ev.generation_stats(["ROMEO:\nthou art gone\nzzz qqq"], {"thou", "art"})
    assert stats["speaker_lines"] == pytest.approx(1 / 3)
    assert stats["known_words"] == pytest.approx(2 / 6)  # romeo thou art gone zzz qqq
    assert stats["words"] == 6


# -------------------------------------------------------------- contamination


def test_contamination_finder_finds_planted_overlaps():
    items = ev.load_mc_items("next_line")[:40]
    train = "the quick brown fox jumps over the lazy dog " * 3
    planted = [ev.item_text(items[k]) for k in (3, 17, 29)]
    index = ev.ngram_set([train, *planted], 8)
    overlap = ev.ngram_overlap([ev.item_text(i) for i in items], index, 8)
    assert set(np.flatnonzero(overlap == 1.0)) == {3, 17, 29}
    assert overlap[[k for k in range(40) if k not in (3, 17, 29)]].max() < 0.5
    # a half-leaked text: half its 8-grams are found
    vocab = [chr(97 + i // 26) + chr(97 + i % 26) for i in range(30)]  # aa ab .. bd
    text, half = " ".join(vocab), " ".join(vocab[15:])
    assert ev.ngram_overlap([text], ev.ngram_set([half], 8), 8)[0] == pytest.approx(
        8 / 23
    )


# ---------------------------------------------------------------------- report


def test_report_command_line(tmp_path, capsys):
    out = tmp_path / "report.json"
    reports = evaluate_main(["--quick", "--model", "base", "--json", str(out)])
    report = reports["base"]
    assert out.exists()
    for key in ev.REPORT_ROWS:
        assert key in report
    assert 1.0 < report["bits_per_char"] < 4.0
    lo, hi = report["speaker_acc_ci"]
    assert lo <= report["speaker_acc"] <= hi
    table = ev.report_table(reports)
    assert (
        "held-out bits/char" in table and table.count("\n") == len(ev.REPORT_ROWS) + 1
    )
    # stdout holds the table and nothing else; progress went to stderr, a line per
    # stage, after a line that says what will be done
    printed = capsys.readouterr()
    assert printed.out == ev.report_table(reports, text=True) + "\n"
    lines = printed.err.splitlines()
    assert lines[0].startswith("evaluating 1 model (base) on 20,000 held-out char")
    assert "next_line (40 items), speaker (40 items), 20 instructions" in lines[0]
    stages = ["held-out text", "next_line", "speaker", "instructions", "samples"]
    for stage in stages:
        assert any(line.startswith(f"[1/1] base: {stage} ") for line in lines), stage
    assert lines[-1].startswith("[1/1] base: done in ")


def test_report_command_line_estimates_the_time_left(monkeypatch, capsys):
    import shared.evaluate as cli
    from shared.evaluation import report

    def fake_report(model, tokenizer, progress=None, **kwargs):
        for stage in ("held-out text", "next_line", "speaker"):
            progress(stage, 1.0)
        return {"seconds": 3.0, "bits_per_char": 2.0}

    monkeypatch.setattr(report, "evaluate_model", fake_report)
    cli.main(["--model", "base", "sft", "lora"])
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert lines[0].startswith("evaluating 3 models (base, sft, lora) on 111,540")
    first_done = lines.index(next(x for x in lines if x.startswith("[1/3] base: done")))
    # right after the first model, before the second starts: its time, times two
    estimate = lines[first_done + 1]
    assert estimate.startswith("about ") and estimate.endswith("left for 2 more models")
    assert lines[first_done + 2] == "[2/3] sft: held-out text 1 s"
    assert sum(line.startswith("about ") for line in lines) == 1
    assert printed.out.startswith("metric") and "held-out bits/char" in printed.out
    assert report.time_left(40, 3) == "about 2.0 min left for 3 more models"
    assert report.time_left(40, 1) == "about 40 s left for 1 more model"


def test_mcnemar_matches_scipy_binomial_test_and_ignores_concordant_items():
    from scipy.stats import binomtest

    from shared.evaluation import mcnemar

    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.6
    b = np.where(rng.random(300) < 0.2, ~a, a)  # B flips a fifth of A's results
    r = mcnemar(a, b)
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    assert (r["a_only"], r["b_only"]) == (n_ab, n_ba)
    expected = binomtest(n_ab, n_ab + n_ba, 0.5).pvalue
    assert r["p_value"] == pytest.approx(expected, rel=1e-9)
    assert r["difference"] == pytest.approx(a.mean() - b.mean())
    # items both get right or both get wrong change nothing
    more = mcnemar(
        np.r_[a, [True] * 50, [False] * 50], np.r_[b, [True] * 50, [False] * 50]
    )
    assert more["p_value"] == pytest.approx(r["p_value"])
    assert mcnemar(a, a)["p_value"] == 1.0
    # a lopsided split is significant: 20 discordant items, all A's
    assert mcnemar([True] * 20, [False] * 20)["p_value"] == pytest.approx(2 / 2**20)
