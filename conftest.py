"""pytest configuration shared by unit tests and notebook tests (nbval).

The test run always uses the ``smoke`` mode: every notebook runs its whole code path
on tiny workloads. Kernels started by nbval inherit this environment.

Before anything runs, the session checks that the data the tests need can be had (the
Tiny Shakespeare corpus, GPT-2's tokenizer files): offline without them, one message
says what is missing and which variable provides it, instead of a hundred tracebacks.
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


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = missing_course_data()
    if problems:
        listed = "\n\n".join(f"{i}. {p}" for i, p in enumerate(problems, 1))
        sys.stderr.write(
            "\nThe tests need data this machine cannot get (offline?):\n\n"
            f"{listed}\n\nSee 'Offline machines' in README.md.\n\n"
        )
        pytest.exit("the course's data is missing (see above)", returncode=3)
