"""pytest configuration shared by unit tests and notebook tests (nbval).

The test run always uses the ``smoke`` mode: every notebook runs its whole code path
on tiny workloads. Kernels started by nbval inherit this environment.

Before anything runs, the session checks that the data the tests need can be had (the
Tiny Shakespeare corpus, GPT-2's tokenizer files): offline without them, one message
says what is missing and which variable provides it, instead of a hundred tracebacks.
It checks the same way that the course models committed in ``data/models/`` are all
there: a missing one is an error that names the folder and the script that makes it,
never a quietly skipped test.
"""

import os
import sys

import pytest

os.environ["BOOK_MODE"] = "smoke"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")


def missing_course_data() -> list[str]:
    """What the tests need but cannot get: one explanation per missing file."""
    from shared.data import DataUnavailableError, fetch
    from shared.tokenizer.gpt2 import gpt2_encoding

    problems = []
    for need in (lambda: fetch("tinyshakespeare", timeout=10), gpt2_encoding):
        try:
            need()
        except DataUnavailableError as err:
            problems.append(str(err))
    return problems


# the script that trains each shipped model (chapter 07 makes all three fine-tunes)
MODEL_SCRIPTS = {
    "base": "chapters/04_pretraining/train_shakespeare.py",
    "sft": "chapters/07_finetuning_dpo/train_finetuned.py",
    "lora": "chapters/07_finetuning_dpo/train_finetuned.py",
    "dpo": "chapters/07_finetuning_dpo/train_finetuned.py",
}


def missing_course_models() -> list[str]:
    """Which shipped models are incomplete: one explanation per model folder."""
    from shared.data import REPO_ROOT
    from shared.pretrained import COURSE_MODELS, MODELS_DIR

    problems = []
    for name, folder in COURSE_MODELS.items():
        path = MODELS_DIR / folder
        full = {"config.json", "model.safetensors"}
        adapter = {"adapter_config.json", "adapter_model.safetensors"}
        have = {p.name for p in path.iterdir()} if path.is_dir() else set()
        if full <= have or adapter <= have:
            continue
        lacking = sorted((adapter if "adapter_config.json" in have else full) - have)
        script = MODEL_SCRIPTS.get(name, "its chapter's training script")
        problems.append(
            f"{path.relative_to(REPO_ROOT)}/ (course model {name!r}) lacks "
            f"{', '.join(lacking)}: restore it (`git checkout -- data/models`) or "
            f"make it with `python {script}`"
        )
    return problems


def _listed(problems: list[str]) -> str:
    return "\n\n".join(f"{i}. {p}" for i, p in enumerate(problems, 1))


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = missing_course_data()
    if problems:
        sys.stderr.write(
            "\nThe tests need data this machine cannot get (offline?):\n\n"
            f"{_listed(problems)}\n\nSee 'Offline machines' in README.md.\n\n"
        )
        pytest.exit("the course's data is missing (see above)", returncode=3)
    problems = missing_course_models()
    if problems:
        sys.stderr.write(
            "\nThe tests need the course models committed in data/models/:\n\n"
            f"{_listed(problems)}\n\n"
        )
        pytest.exit("a shipped course model is missing (see above)", returncode=3)


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one process (this one), for torch.distributed code in
    unit tests; destroyed afterwards."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
