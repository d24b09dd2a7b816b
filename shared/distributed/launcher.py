"""Starting a distributed job from Python: ``torchrun`` on this machine, its log
streamed back line by line, and a clear error when it fails or runs over its time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    script: str | Path, args: Sequence[str] = (), nproc: int = 2
) -> list[str]:
    """The ``torchrun`` command line for ``script`` on this machine (``--standalone``).

    Several machines need a rendezvous instead: see ``launch/two_agents.sh`` and
    ``launch/train.sbatch`` in chapter 6.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return cmd + [f"--nproc_per_node={nproc}", str(script), *map(str, args)]


_ERROR = re.compile(r"Error|Traceback|terminate called|what\(\)|Abort")


def parent_table() -> dict[int, int]:
    """Every process's parent: from ``/proc`` on Linux, from ``ps`` on macOS."""
    if Path("/proc/self/stat").exists():
        table = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):  # ended meanwhile
                    stat = (entry / "stat").read_text()  # pid (name) state ppid ...
                    table[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
        return table
    ps = ["ps", "-A", "-o", "pid=", "-o", "ppid="]
    rows = subprocess.run(ps, capture_output=True, text=True).stdout.split("\n")
    return {int(r.split()[0]): int(r.split()[1]) for r in rows if r.strip()}


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for child, parent in parent_table().items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_job(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (started in a session of its own), every process below it and
    their process groups.

    ``torchrun`` starts each worker in a new session too, so killing torchrun, or
    its process group, leaves the workers running, holding the log pipe open.
    """
    if os.name != "posix":
        proc.kill()
        return
    tree = process_tree(proc.pid)  # now: a killed parent's children lose the link
    groups = set()
    for pid in tree:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())  # never our own group (the notebook, pytest)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def launch(
    script: str | Path,
    args: Sequence[str] = (),
    nproc: int = 2,
    threads: int = 1,
    echo: Callable[[str], None] | None = print,
    timeout: float = 900,
    env: dict | None = None,
) -> list[str]:
    """Run ``script`` under ``torchrun`` with ``nproc`` processes; stream its log.

    A notebook cannot hand its own functions to new processes, so distributed code
    lives in a script and the notebook launches it. ``nproc=0`` runs plain
    ``python`` (one process, no process group). ``threads`` sets ``OMP_NUM_THREADS``
    per process. Returns the log lines; raises with the log's tail on failure.
    After ``timeout`` seconds (a hung collective, say), or on an interrupt, the whole
    job is killed: ``torchrun`` and every worker.
    """
    if nproc == 0:
        cmd = [sys.executable, str(script), *map(str, args)]
    else:
        cmd = torchrun_command(script, args, nproc)
    full_env = os.environ | {"OMP_NUM_THREADS": str(threads)} | (env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    lines: list[str] = []
    timed_out = threading.Event()

    def stop(proc: subprocess.Popen) -> None:
        timed_out.set()
        kill_job(proc)

    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        start_new_session=True,  # one group to kill; a terminal's Ctrl-C comes to us
    ) as proc:  # fmt: skip
        watchdog = threading.Timer(timeout, stop, args=(proc,))
        watchdog.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line.rstrip("\n"))
                if echo is not None:
                    echo(lines[-1])
            code = proc.wait()
        except BaseException:  # an interrupt (or echo failed): take the job down too
            kill_job(proc)
            raise
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        raise TimeoutError(f"{script} ran over {timeout} s and was stopped")
    if code != 0:
        # the ranks' own errors come before torchrun's summary: keep both
        errors = [ln for ln in lines if _ERROR.search(ln)][:20]
        text = "\n".join([*errors, "...", *lines[-30:]] if errors else lines[-30:])
        raise RuntimeError(f"{Path(script).name} failed (exit {code}):\n{text}")
    return lines
