"""Fetching the course's data: registered public URLs, SHA-256 checked, mirror-aware.

``fetch(name)`` returns a local path to a registered file. It looks, in order, at

1. the download cache ``data/downloads/`` (or ``$BOOK_DATA_DIR``), if its checksum
   matches;
2. a mirror folder named by ``$BOOK_DATA_MIRROR`` (for offline machines and CI);
3. the file's public URL.

A file whose SHA-256 does not match is never kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataFile:
    """A file the course downloads: where it lives online and what it must hash to."""

    name: str
    url: str
    sha256: str
    relpath: str  # path inside the download cache and inside a mirror folder
    size: int | None = None
    description: str = ""


REGISTRY: dict[str, DataFile] = {}


class DataUnavailableError(FileNotFoundError):
    """A registered file is neither cached, mirrored, nor downloadable."""


class ChecksumError(ValueError):
    """A file's SHA-256 does not match the registry."""


def register(entry: DataFile) -> DataFile:
    """Add (or replace) a registry entry and return it."""
    REGISTRY[entry.name] = entry
    return entry


register(
    DataFile(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
        "tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        relpath="tinyshakespeare/input.txt",
        size=1_115_394,
        description="Tiny Shakespeare: ~40k lines of Shakespeare (char-rnn corpus)",
    )
)


def cache_dir() -> Path:
    """The download cache: ``$BOOK_DATA_DIR``, else ``data/downloads`` in the repo."""
    env = os.environ.get("BOOK_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "data" / "downloads"


def artefact_dir() -> Path:
    """Derived artefacts (trained tokenizers, cached ids): ``$BOOK_CACHE_DIR`` or
    ``data/cache`` in the repo."""
    env = os.environ.get("BOOK_CACHE_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "data" / "cache"


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, *, timeout: float = 30.0, verbose: bool = False) -> Path:
    """Return a local, checksum-verified path to the registered file ``name``."""
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "(none)"
        raise KeyError(f"no data file registered as {name!r}; known: {known}")
    entry = REGISTRY[name]
    dest = cache_dir() / entry.relpath

    if dest.exists():
        if sha256sum(dest) == entry.sha256:
            return dest
        dest.unlink()  # a stale or damaged download is never kept
        if verbose:
            print(f"{dest} had the wrong checksum; removed it")

    mirror = os.environ.get("BOOK_DATA_MIRROR")
    if mirror:
        candidate = Path(mirror).expanduser() / entry.relpath
        if candidate.exists():
            actual = sha256sum(candidate)
            if actual != entry.sha256:
                raise ChecksumError(
                    f"mirror file {candidate} has SHA-256 {actual}, expected "
                    f"{entry.sha256}; replace it with the file from {entry.url}"
                )
            _copy_atomic(candidate, dest)
            if verbose:
                print(f"copied {entry.name} from mirror {candidate}")
            return dest

    try:
        _download(entry, dest, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        if isinstance(err, ChecksumError):
            raise
        raise DataUnavailableError(_offline_message(entry, dest, mirror, err)) from err
    if verbose:
        print(f"downloaded {entry.name} from {entry.url}")
    return dest


def _download(entry: DataFile, dest: Path, timeout: float) -> None:
    digest = hashlib.sha256()
    with (
        atomic_write(dest) as out,
        urllib.request.urlopen(entry.url, timeout=timeout) as response,
    ):
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != entry.sha256:  # raising here discards the file
            raise ChecksumError(
                f"download of {entry.name} from {entry.url} has SHA-256 "
                f"{digest.hexdigest()}, expected {entry.sha256}; the file was discarded"
            )


def _copy_atomic(src: Path, dest: Path) -> None:
    with atomic_write(dest) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Write to a temporary file beside ``path``; move it into place only on success.

    Readers never see a half-written file, and an exception leaves nothing behind:
    no file, and no folder that this call created. ``mode`` and ``kwargs`` go to
    ``open`` (e.g. ``"w", encoding="utf-8"``).
    """
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    done = False
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary files
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            os.unlink(tmp)
            for folder in created:  # deepest first; rmdir only removes empty ones
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _offline_message(
    entry: DataFile, dest: Path, mirror: str | None, err: Exception
) -> str:
    where = (
        f"\n  - or put it at {Path(mirror).expanduser() / entry.relpath}"
        " (BOOK_DATA_MIRROR)"
        if mirror
        else f"\n  - or set BOOK_DATA_MIRROR to a folder that holds {entry.relpath}"
    )
    return (
        f"could not download {entry.name!r} from {entry.url} ({err}).\n"
        f"If this machine is offline, get the file elsewhere and either\n"
        f"  - put it at {dest}{where}\n"
        f"Its SHA-256 must be {entry.sha256}."
    )


def read_text(name: str) -> str:
    """Fetch a registered text file and return its contents (UTF-8)."""
    return fetch(name).read_text(encoding="utf-8")
