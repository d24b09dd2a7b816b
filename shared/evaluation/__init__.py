"""Evaluation, in layers: scoring text (``scoring``: sliding windows,
log-likelihood requests), multiple-choice tasks (``multiple_choice``), instruction
accuracy (``instructions``), intervals and calibration (``statistics``), generated
text and contamination (``text_metrics``), one report per model (``report``), and
the same tasks in lm-evaluation-harness (``harness``, imported on its own:
``from shared.evaluation.harness import run_lm_eval``).

Everything else public is importable from here, the loss units of ``shared.loss``
included: ``from shared import evaluation as ev; ev.bits_per_char(...)``.
"""

from shared.evaluation.heads import (
    CopyAlignment,
    ablate_heads,
    ablation_accuracy,
    copy_alignment,
    copy_attention,
    copy_map,
    single_head_ablations,
    top_heads,
)
from shared.evaluation.instructions import (
    accuracy_interval,
    answers,
    response_loss,
    task_accuracy,
)
from shared.evaluation.multiple_choice import (
    EVAL_DIR,
    MC_TASKS,
    MCItem,
    MCResult,
    chance_accuracy,
    held_out_text,
    load_mc_items,
    make_next_line_items,
    make_speaker_items,
    mc_requests,
    score_mc,
)
from shared.evaluation.report import (
    REPORT_ROWS,
    evaluate_model,
    evaluate_models,
    report_table,
    training_vocabulary,
)
from shared.evaluation.scoring import (
    TokenScores,
    encode_text,
    loglikelihood,
    score_tokens,
    split_request,
)
from shared.evaluation.statistics import (
    block_bootstrap_ci,
    bootstrap_ci,
    expected_calibration_error,
    mcnemar,
    paired_bootstrap_ci,
    reliability,
)
from shared.evaluation.text_metrics import (
    distinct_n,
    generation_stats,
    item_text,
    ngram_overlap,
    ngram_set,
    ngrams,
    repetition_rate,
    sample_texts,
    words,
)
from shared.loss import (
    bits_per_byte,
    bits_per_char,
    context_length_of,
    estimate_loss,
    evaluate_split,
    perplexity,
)

__all__ = [
    "CopyAlignment",
    "EVAL_DIR",
    "MCItem",
    "MCResult",
    "MC_TASKS",
    "REPORT_ROWS",
    "TokenScores",
    "ablate_heads",
    "ablation_accuracy",
    "accuracy_interval",
    "answers",
    "bits_per_byte",
    "bits_per_char",
    "block_bootstrap_ci",
    "bootstrap_ci",
    "chance_accuracy",
    "context_length_of",
    "copy_alignment",
    "copy_attention",
    "copy_map",
    "distinct_n",
    "encode_text",
    "estimate_loss",
    "evaluate_model",
    "evaluate_models",
    "evaluate_split",
    "expected_calibration_error",
    "generation_stats",
    "held_out_text",
    "item_text",
    "load_mc_items",
    "loglikelihood",
    "make_next_line_items",
    "make_speaker_items",
    "mc_requests",
    "ngram_overlap",
    "ngram_set",
    "ngrams",
    "mcnemar",
    "paired_bootstrap_ci",
    "perplexity",
    "reliability",
    "repetition_rate",
    "report_table",
    "sample_texts",
    "score_mc",
    "score_tokens",
    "single_head_ablations",
    "split_request",
    "response_loss",
    "task_accuracy",
    "top_heads",
    "training_vocabulary",
    "words",
]
