"""Offline without the data: pytest stops at once, with one message saying the fix."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pytest_offline_without_data_fails_fast_with_one_clear_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("BOOK_DATA_MIRROR", None)
    env |= {
        "BOOK_DATA_DIR": str(tmp_path / "downloads"),  # an empty download cache
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"),  # an empty tiktoken cache
        # every connection goes to a closed local port: offline, deterministically
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_mode.py", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "passed" not in out  # it stopped before running anything
    assert len(out.splitlines()) < 40, out  # one message, not pages of tracebacks
    assert "tinyshakespeare/input.txt" in out and "BOOK_DATA_MIRROR" in out
    assert "TIKTOKEN_CACHE_DIR" in out
    assert "Offline machines" in out
