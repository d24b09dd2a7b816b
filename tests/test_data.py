import hashlib
from pathlib import Path

import pytest

from shared import data
from shared.data import (
    REGISTRY,
    ChecksumError,
    DataFile,
    DataUnavailableError,
    fetch,
    register,
    sha256sum,
)

PAYLOAD = b"To be, or not to be, that is the question.\n" * 50
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An isolated cache, no mirror, and a registered file served from a file:// URL."""
    monkeypatch.setenv("BOOK_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BOOK_DATA_MIRROR", raising=False)
    origin = tmp_path / "origin" / "hamlet.txt"
    origin.parent.mkdir()
    origin.write_bytes(PAYLOAD)
    entry = register(
        DataFile("hamlet-test", origin.as_uri(), PAYLOAD_SHA, "hamlet/hamlet.txt")
    )
    yield tmp_path, entry
    REGISTRY.pop("hamlet-test", None)


def test_download_verifies_and_caches(sandbox):
    tmp_path, entry = sandbox
    path = fetch("hamlet-test")
    assert path == tmp_path / "cache" / "hamlet" / "hamlet.txt"
    assert path.read_bytes() == PAYLOAD
    # the second call is served from the cache even when the origin disappears
    (tmp_path / "origin" / "hamlet.txt").unlink()
    assert fetch("hamlet-test") == path


def test_mirror_is_used_before_the_network(sandbox, monkeypatch):
    tmp_path, entry = sandbox
    mirror = tmp_path / "mirror"
    (mirror / "hamlet").mkdir(parents=True)
    (mirror / "hamlet" / "hamlet.txt").write_bytes(PAYLOAD)
    (tmp_path / "origin" / "hamlet.txt").unlink()  # network copy gone
    monkeypatch.setenv("BOOK_DATA_MIRROR", str(mirror))
    assert fetch("hamlet-test").read_bytes() == PAYLOAD


def test_bad_mirror_file_is_rejected(sandbox, monkeypatch):
    tmp_path, entry = sandbox
    mirror = tmp_path / "mirror"
    (mirror / "hamlet").mkdir(parents=True)
    (mirror / "hamlet" / "hamlet.txt").write_bytes(PAYLOAD + b"tampered")
    monkeypatch.setenv("BOOK_DATA_MIRROR", str(mirror))
    with pytest.raises(ChecksumError, match="expected"):
        fetch("hamlet-test")
    assert not (tmp_path / "cache" / "hamlet" / "hamlet.txt").exists()


def test_corrupt_download_is_not_kept(sandbox):
    tmp_path, entry = sandbox
    (tmp_path / "origin" / "hamlet.txt").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="discarded"):
        fetch("hamlet-test")
    assert not (tmp_path / "cache").exists(), "no partial file nor its folder remain"


def test_corrupt_cached_file_is_replaced(sandbox):
    tmp_path, entry = sandbox
    dest = tmp_path / "cache" / "hamlet" / "hamlet.txt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    assert fetch("hamlet-test").read_bytes() == PAYLOAD


def test_offline_without_mirror_says_where_to_put_the_file(sandbox):
    tmp_path, entry = sandbox
    register(
        DataFile(
            "offline-test", "http://127.0.0.1:9/none.txt", PAYLOAD_SHA, "o/none.txt"
        )
    )
    try:
        with pytest.raises(DataUnavailableError) as info:
            fetch("offline-test", timeout=2)
        message = str(info.value)
        assert str(tmp_path / "cache" / "o" / "none.txt") in message
        assert not (tmp_path / "cache").exists(), "the failed download left folders"
        assert "BOOK_DATA_MIRROR" in message and PAYLOAD_SHA in message
    finally:
        REGISTRY.pop("offline-test", None)


def test_unknown_name():
    with pytest.raises(KeyError, match="tinyshakespeare"):
        fetch("no-such-file")


def test_tiny_shakespeare_is_registered_with_its_published_facts():
    entry = REGISTRY["tinyshakespeare"]
    assert entry.size == 1_115_394
    assert entry.sha256.startswith("86c4e6aa")
    assert entry.url.startswith("https://")


def test_tiny_shakespeare_fetch_gives_the_published_file():
    # conftest.py has made sure the corpus is reachable (mirror, cache or network)
    path = fetch("tinyshakespeare", timeout=10)
    assert path.stat().st_size == 1_115_394
    assert sha256sum(path) == REGISTRY["tinyshakespeare"].sha256
    assert Path(data.cache_dir()) in path.parents


def test_atomic_write_replaces_only_on_success(tmp_path):
    from shared.data import atomic_write

    target = tmp_path / "sub" / "file.txt"
    with atomic_write(target, "w", encoding="utf-8") as f:
        f.write("first")
    assert target.read_text() == "first"
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half-written")
        raise RuntimeError("interrupted")
    assert target.read_text() == "first"  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
    deep = tmp_path / "a" / "b" / "file.txt"
    with pytest.raises(RuntimeError), atomic_write(deep) as f:
        raise RuntimeError("interrupted")
    assert not (tmp_path / "a").exists()  # the folders it made are gone too
