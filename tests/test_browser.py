"""The notebooks as a reader meets them: JupyterLab in a real browser.

One test starts ``jupyter lab``, opens chapter 2's notebook in Debian's Chromium
(headless, driven by Selenium), runs all cells in smoke mode from the menus, checks
that no cell shows an error, then moves the ``head`` slider of the chapter's attention
explorer with the keyboard and checks that the widget draws a different figure.

It works on a copy of the chapter folder in a temporary directory (JupyterLab writes
checkpoints and can autosave; the checkout is never touched) with JupyterLab's user
settings, workspaces and runtime files in that directory too.

Screenshots go to ``build/browser/`` (or ``$LLM_COURSE_BROWSER_SHOTS``):
``01_run_all.png`` after Run All, ``02_widget_before.png`` and
``03_widget_after.png`` around the slider move.

Needs ``chromium`` and ``chromedriver`` on PATH (Debian/Ubuntu: ``apt-get install
chromium chromium-driver``); Selenium is told where both are, so it downloads nothing.
Without them the test skips, unless ``LLM_COURSE_REQUIRE_BROWSER=1`` (set by CI) makes
it fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared.data import REPO_ROOT

CHAPTER = "02_attention"
NOTEBOOK = f"chapters/{CHAPTER}/{CHAPTER}.ipynb"
SLIDER = "head"  # the description of the slider the test moves
HARD_TIMEOUT_S = 900  # the whole test, server start to teardown: it never hangs pytest
RUN_ALL_TIMEOUT_S = 600  # smoke mode: ~30 s alone, a few minutes on a busy machine
REQUIRED = os.environ.get("LLM_COURSE_REQUIRE_BROWSER") == "1"

# JupyterLab's user settings for the test: no autosave, every cell in the DOM (the
# default virtual scrolling leaves off-screen cells out), no requests to the internet
LAB_SETTINGS = {
    "docmanager-extension/plugin": {"autosave": False},
    "notebook-extension/tracker": {"windowingMode": "none"},
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "extensionmanager-extension/plugin": {"enabled": False},
}


def unavailable(reason: str) -> None:
    """Skip, or fail where CI installed the browser (LLM_COURSE_REQUIRE_BROWSER=1)."""
    if REQUIRED:
        pytest.fail(f"{reason}; LLM_COURSE_REQUIRE_BROWSER=1 forbids skipping")
    pytest.skip(reason)


def find_browser() -> tuple[str, str]:
    """Paths of the system's Chromium and chromedriver, or skip (fail in CI)."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    browser = next(filter(None, map(shutil.which, names)), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        lacking = [
            n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p
        ]
        unavailable(
            f"{' and '.join(lacking)} not on PATH "
            "(Debian/Ubuntu: apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("selenium is not installed (pip install -r requirements.txt)")
    return browser, driver


@contextlib.contextmanager
def hard_timeout(seconds: int):
    """Raise TimeoutError in the test wherever it waits, after `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"the browser test ran past its hard limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(
        f"{base}{path}", method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of the chapter, in smoke mode; shut down after."""
    root = tmp_path / "course"
    shutil.copytree(
        REPO_ROOT / "chapters" / CHAPTER,
        root / "chapters" / CHAPTER,
        ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"),
    )
    settings = tmp_path / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "BOOK_MODE": "smoke",
        # the kernel draws inline (the test session's MPLBACKEND=Agg would draw nothing)
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        # Jupyter's per-user folders, empty: a kernel "python3" installed for the user
        # (another Python) cannot shadow this environment's, nothing is written home
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    # BOOK_DATA_MIRROR and TIKTOKEN_CACHE_DIR (offline machines) pass on from os.environ
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}",
        # window.jupyterapp: the test reads the cells' outputs from the notebook model
        # (JupyterLab draws an error like text on stderr, with no mark of its own)
        "--LabApp.expose_app_in_browser=True",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers run as root; JupyterLab refuses then
    log_path = tmp_path / "jupyter-lab.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up():
            if server.poll() is not None:
                pytest.fail(
                    f"jupyter lab exited with {server.returncode}:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(OSError):
                return api(base, token, "/api/status")

        wait_for("jupyter lab to answer", up, timeout=120)
        yield {"base": base, "token": token, "root": root, "log": log_path}
    finally:
        # /api/shutdown stops the kernels too; then the process, by force if need be
        with contextlib.suppress(Exception):
            api(base, token, "/api/shutdown", method="POST")
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


@pytest.fixture
def browser():
    """Headless Chromium from the system, through the system's chromedriver."""
    browser_path, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1400",
    ):
        options.add_argument(arg)
    # an explicit driver path: Selenium Manager (which downloads drivers) never runs
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots():
    folder = Path(
        os.environ.get("LLM_COURSE_BROWSER_SHOTS") or REPO_ROOT / "build" / "browser"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def menu(driver, title: str, command: str) -> None:
    """Click a JupyterLab main-menu entry, e.g. Run → Run All Cells."""
    from selenium.webdriver.common.by import By

    bar = driver.find_element(By.ID, "jp-MainMenu")
    item = next(
        (
            e
            for e in bar.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
            if e.text == title
        ),
        None,
    )
    assert item is not None, f"no '{title}' menu in JupyterLab's menu bar"
    item.click()
    selector = f".lm-Menu li.lm-Menu-item[data-command='{command}']"
    deadline = time.monotonic() + 10
    while not (entries := driver.find_elements(By.CSS_SELECTOR, selector)):
        if time.monotonic() > deadline:
            shown = [
                e.get_attribute("data-command")
                for e in driver.find_elements(
                    By.CSS_SELECTOR, ".lm-Menu li.lm-Menu-item"
                )
            ]
            pytest.fail(f"the {title} menu has no {command}; it shows {shown}")
        time.sleep(0.2)
    entries[0].click()


PROMPTS_JS = """
return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell'))
  .map(c => (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '');
"""
ERRORS_JS = """
const notebook = window.jupyterapp.shell.currentWidget.content;
const errors = [];
notebook.widgets.forEach((cell, i) => {
  if (cell.model.type !== 'code') return;
  for (const out of cell.model.outputs.toJSON())
    if (out.output_type === 'error')
      errors.push(`cell ${i + 1}: ${out.ename}: ${out.evalue}`);
});
return errors;
"""


def kernel_state(lab) -> str | None:
    for session in api(lab["base"], lab["token"], "/api/sessions"):
        if session["path"].endswith(NOTEBOOK.rsplit("/", 1)[1]):
            return session["kernel"]["execution_state"]
    return None


def test_chapter_runs_and_widget_redraws_in_chromium(browser, lab, shots, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    with hard_timeout(HARD_TIMEOUT_S):
        driver.get(f"{lab['base']}/lab/tree/{NOTEBOOK}?token={lab['token']}")
        wait_for(
            "the notebook to open",
            lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell"),
            timeout=120,
        )
        wait_for(
            "the kernel to start", lambda: kernel_state(lab) == "idle", timeout=120
        )
        n_code = len(driver.execute_script(PROMPTS_JS))

        # a clean slate: the committed outputs (and their execution counts) go first
        menu(driver, "Edit", "editmenu:clear-all")  # Clear Outputs of All Cells
        wait_for(
            "the outputs to clear",
            lambda: all(
                p.strip() in ("[ ]:", "") for p in driver.execute_script(PROMPTS_JS)
            ),
            timeout=30,
        )
        started = time.monotonic()
        menu(driver, "Run", "runmenu:run-all")  # Run All Cells

        def finished():
            prompts = driver.execute_script(PROMPTS_JS)
            return "[*]:" not in prompts and kernel_state(lab) == "idle"

        time.sleep(2)  # Run All marks the queued cells [*] at once
        wait_for("Run All to finish", finished, timeout=RUN_ALL_TIMEOUT_S, interval=1)
        run_all_s = time.monotonic() - started
        driver.save_screenshot(str(shots / "01_run_all.png"))

        errors = driver.execute_script(ERRORS_JS)
        assert not errors, "cells show errors:\n" + "\n".join(errors)
        prompts = driver.execute_script(PROMPTS_JS)
        not_run = [i for i, p in enumerate(prompts) if not p.strip("[]: ").isdigit()]
        assert len(prompts) == n_code and not not_run, (
            f"code cells {not_run} of {len(prompts)} did not run: {prompts}"
        )

        # the attention explorer: an interact() with a slider labelled SLIDER
        interact = driver.find_elements(
            By.CSS_SELECTOR, ".jp-Notebook .widget-interact"
        )
        assert interact, "no interact() widget rendered in the notebook"
        widget = interact[0]
        sliders = [
            s
            for s in widget.find_elements(By.CSS_SELECTOR, ".widget-slider")
            if s.find_element(By.CSS_SELECTOR, ".widget-label").text.strip() == SLIDER
        ]
        assert sliders, f"the interact widget has no slider labelled '{SLIDER}'"
        slider = sliders[0]
        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
        handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")

        def figure():
            # the figure's bytes (a data: URL), hashed: a short failure message
            imgs = widget.find_elements(By.CSS_SELECTOR, ".widget-output img")
            src = imgs[0].get_attribute("src") if imgs else None
            return hashlib.sha256(src.encode()).hexdigest()[:16] if src else None

        before = wait_for("the widget's figure", figure, timeout=60)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", widget)
        time.sleep(0.5)
        driver.save_screenshot(str(shots / "02_widget_before.png"))
        value_before = readout.text

        handle.send_keys(Keys.ARROW_RIGHT)  # the keyboard, as a reader can
        wait_for(
            f"the '{SLIDER}' slider to move from {value_before}",
            lambda: readout.text != value_before,
            timeout=30,
        )
        deadline = time.monotonic() + 60
        after = figure()
        while (after is None or after == before) and time.monotonic() < deadline:
            time.sleep(0.5)
            after = figure()
        time.sleep(0.5)  # let the new image paint before the screenshot
        driver.save_screenshot(str(shots / "03_widget_after.png"))
        assert after is not None, "the widget's figure vanished after moving the slider"
        assert after != before, (
            f"moving '{SLIDER}' from {value_before} to {readout.text} left the "
            f"widget's figure unchanged (PNG sha256 {before}… both times)"
        )

    with capsys.disabled():
        print(
            f"\n[browser] Run All in JupyterLab: {run_all_s:.0f} s; "
            f"'{SLIDER}' {value_before} -> {readout.text} redrew the figure; "
            f"screenshots in {shots}"
        )
