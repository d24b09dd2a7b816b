"""Nothing lost: every model, config, tokenizer and results file is written to a
temporary name, flushed to the disk and renamed, so a full disk (simulated here with
ENOSPC) leaves the old files as they were and says which file it was writing."""

from __future__ import annotations

import errno
import os
import pathlib
import sys

import pytest
import safetensors.torch

from shared import lora
from shared.data import DiskFullError, write_files
from shared.hf_export import export_hf
from shared.pretrained import load_course_model, save_course_model

sys.path.insert(
    0, str(pathlib.Path(__file__).parent.parent / "chapters/07_finetuning_dpo")
)
import train_finetuned  # noqa: E402


@pytest.fixture(scope="module")
def course():
    return load_course_model("cpu")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def contents(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file of ``folder`` (temporary ones included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_full_disk_while_writing_the_weights_keeps_the_old_model(
    course, tmp_path, monkeypatch
):
    model, tok, _ = course
    folder = save_course_model(model, tok, tmp_path / "model", {"name": "old"})
    before = contents(folder)

    def save_model(model, filename, *args, **kwargs):
        pathlib.Path(filename).write_bytes(b"\0" * 1000)  # what fitted on the disk
        disk_full()

    monkeypatch.setattr(safetensors.torch, "save_model", save_model)
    with pytest.raises(DiskFullError) as full:
        save_course_model(model, tok, folder, {"name": "new"})
    assert str(full.value).startswith("no space left on ")
    assert f"while writing {folder / 'model.safetensors'}" in str(full.value)
    assert contents(folder) == before


def test_a_full_disk_on_the_last_file_keeps_every_old_file(
    course, tmp_path, monkeypatch
):
    model, tok, _ = course
    folder = save_course_model(model, tok, tmp_path / "model", {"name": "old"})
    before = contents(folder)
    write_text = pathlib.Path.write_text

    def config_fails(path, data, *args, **kwargs):
        if "config.json" in path.name:
            write_text(path, data[:10], *args, **kwargs)
            disk_full()
        return write_text(path, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", config_fails)
    with pytest.raises(DiskFullError, match=r"while writing .*config\.json"):
        save_course_model(model, tok, folder, {"name": "new"})
    monkeypatch.undo()
    assert contents(folder) == before  # not new weights beside the old config
    assert load_course_model("cpu", path=folder)[2]["name"] == "old"


def test_write_files_replaces_all_the_files_or_none(tmp_path, monkeypatch):
    write_files(tmp_path, {"small.json": "{}", "big.bin": b"old" * 10})
    real_write = os.write

    def write(fd, data):
        if len(data) > 1000:
            real_write(fd, bytes(data[:500]))
            disk_full()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DiskFullError, match=r"while writing .*big\.bin"):
        write_files(tmp_path, {"small.json": '{"new": 1}', "big.bin": b"x" * 5000})
    monkeypatch.undo()
    assert contents(tmp_path) == {"big.bin": b"old" * 10, "small.json": b"{}"}


# each writer: (write once into a folder, the file the flush fails on)
def _tokenizer(course, folder):
    course[1].save(folder / "tokenizer.json")
    return "tokenizer.json"


def _course_model(course, folder):
    save_course_model(course[0], course[1], folder, {"name": "x"})
    return "model.safetensors"


def _adapter(course, folder):
    model = lora.apply_lora(load_course_model("cpu")[0])
    lora.save_peft_adapter(model, folder, extra={"name": "x"})
    return "adapter_config.json"


def _finetune_results(course, folder):
    train_finetuned.RESULTS = folder
    train_finetuned.write_results("sft", {"results": {"accuracy": 0.5}})
    return "sft.json"


def _hf_export(course, folder):
    export_hf(course[0], course[1], folder)
    return "config.json"


@pytest.mark.parametrize(
    "writer",
    [_tokenizer, _course_model, _adapter, _finetune_results, _hf_export],
    ids=["tokenizer", "course-model", "lora-adapter", "ch07-results", "hf-export"],
)
def test_a_full_disk_found_when_flushing_keeps_the_old_files(
    course, tmp_path, monkeypatch, writer
):
    monkeypatch.setattr(train_finetuned, "RESULTS", train_finetuned.RESULTS)
    folder = tmp_path / "out"
    folder.mkdir()
    name = writer(course, folder)
    before = contents(folder)
    # the disk filled up; with delayed allocation the write fails at fsync
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DiskFullError) as full:
        writer(course, folder)
    assert f"while writing {folder / name}" in str(full.value)
    assert "the files there before are unchanged" in str(full.value)
    assert contents(folder) == before  # and no temporary file is left
