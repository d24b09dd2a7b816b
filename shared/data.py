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
import errno
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
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


class DiskFullError(OSError):
    """The disk filled up while a file was written; the file's old version is kept."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without "[Errno 28]"


def is_disk_full(err: BaseException) -> bool:
    """True for a full disk, as ``OSError`` or as a library's own error text."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(err) or "os error 28" in str(err)


def _device_of(path: Path) -> str:
    """``/dev/sda1 (mounted at /home)``: the device that holds ``path``."""
    mount = Path(os.path.abspath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = "the device"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                device = fields[0]  # the last entry for a mount point is in force
    return f"{device} (mounted at {mount})"


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError:
    """The error to raise for ``err``, a full disk met while writing ``path``."""
    path = Path(path)
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on {_device_of(path.parent)} while writing {path} "
        f"({type(err).__name__}: {err}); the files there before are unchanged. "
        "Free some space and run it again.",
    )


def _fsync(path: Path) -> None:
    """Flush a file (or, where the system allows, a folder) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # folders cannot be opened on Windows; nothing to flush there
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not path.is_dir() or is_disk_full(err):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Callable[[str], Path]]:
    """Replace several files of ``folder`` all at once, or none of them.

    ``part(name)`` gives a temporary path beside ``folder/name`` for a writer to
    fill. When the block ends, every part is flushed to the disk (fsync) and only
    then renamed over its name, so readers see the old files or the new ones, never
    a half-written file. An exception removes the parts, and any folder this call
    created, and leaves the old files as they were; a full disk is reported as
    :class:`DiskFullError` naming the file and the device.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    parts: dict[Path, Path] = {}  # final path -> temporary path
    writing: list[Path] = [folder]  # the file being written, for the error message

    def part(name: str) -> Path:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".part-{name}-")
        os.close(fd)
        if folder / name in parts:  # asked for twice: the later part wins
            parts[folder / name].unlink(missing_ok=True)
        parts[folder / name] = Path(tmp)
        writing.append(folder / name)
        return Path(tmp)

    done = False
    try:
        try:
            yield part
            for final, tmp in parts.items():
                writing.append(final)
                _fsync(tmp)
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary files
            for final, tmp in parts.items():  # renames take no space
                os.replace(tmp, final)
            _fsync(folder)
            done = True
        except Exception as err:
            if is_disk_full(err) and not isinstance(err, DiskFullError):
                raise disk_full_error(writing[-1], err) from err
            raise
    finally:
        if not done:
            for tmp in parts.values():
                tmp.unlink(missing_ok=True)
            for p in created:  # deepest first; rmdir only removes empty ones
                with contextlib.suppress(OSError):
                    p.rmdir()


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_files(folder: str | os.PathLike, files: dict[str, bytes | str]) -> list[Path]:
    """Write ``{name: contents}`` into ``folder`` with :func:`atomic_files` (str as
    UTF-8): all the files are replaced, or none. Returns their paths."""
    with atomic_files(folder) as part:
        for name, data in files.items():
            _write_bytes(part(name), data.encode() if isinstance(data, str) else data)
    return [Path(folder) / name for name in files]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Write to a temporary file beside ``path``; move it into place only on success.

    Readers never see a half-written file, and an exception leaves nothing behind:
    no file, and no folder that this call created (:func:`atomic_files` for one
    file). ``mode`` and ``kwargs`` go to ``open`` (e.g. ``"w", encoding="utf-8"``).
    """
    path = Path(path)
    with atomic_files(path.parent) as part, open(part(path.name), mode, **kwargs) as f:
        yield f


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
