import os
import platform
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared import device as dev
from shared.device import describe_environment, get_device, seed_everything


def _pretend(monkeypatch, cuda: bool = False, mps: bool = False, gpus: int = 1):
    """Make this machine look like one with (or without) CUDA and Apple MPS."""
    monkeypatch.delenv("BOOK_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(dev, "_mps_available", lambda: mps)


def test_get_device_returns_a_usable_device_of_this_machine(monkeypatch):
    monkeypatch.delenv("BOOK_DEVICE", raising=False)
    device = get_device()
    torch.zeros(2, device=device)  # it must be usable
    if torch.cuda.is_available():
        assert device.type == "cuda"
    elif dev._mps_available():
        assert device.type == "mps"
    else:
        assert device == torch.device("cpu")


@pytest.mark.parametrize(
    ("cuda", "mps", "picked"),
    [(False, False, "cpu"), (False, True, "mps"), (True, True, "cuda")],
)
def test_get_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, picked):
    _pretend(monkeypatch, cuda=cuda, mps=mps)
    assert get_device() == torch.device(picked)


def test_forced_cpu_wins_over_an_accelerator(monkeypatch):
    _pretend(monkeypatch, cuda=True, mps=True)
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("BOOK_DEVICE", " CPU ")  # spaces and case as typed in a shell
    assert get_device() == torch.device("cpu")
    assert get_device("mps") == torch.device("mps")  # the argument beats the variable


def test_unavailable_device_is_an_error_naming_what_is_there(monkeypatch):
    _pretend(monkeypatch)
    with pytest.raises(RuntimeError, match=r"device='cuda', but CUDA is not available "
                       r"on this machine; available: cpu$"):  # fmt: skip
        get_device("cuda")
    with pytest.raises(RuntimeError, match=r"MPS is not available.*available: cpu$"):
        get_device("mps")
    monkeypatch.setenv("BOOK_DEVICE", "cuda:1")
    with pytest.raises(RuntimeError, match="^BOOK_DEVICE='cuda:1', but CUDA"):
        get_device()


def test_missing_gpu_index_is_an_error(monkeypatch):
    _pretend(monkeypatch, cuda=True, gpus=1)
    assert get_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match=r"'cuda:1', but this machine has 1 CUDA"):
        get_device("cuda:1")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", "cpu0"])
def test_bad_book_device_names_the_variable_and_the_choices(monkeypatch, bad):
    monkeypatch.setenv("BOOK_DEVICE", bad)
    with pytest.raises(ValueError, match=r"BOOK_DEVICE=.*use one of cpu, cuda, mps"):
        get_device()


def _draw(seed: int) -> tuple:
    gen = seed_everything(seed)
    return (
        random.random(),
        np.random.rand(),
        torch.rand(3).tolist(),
        torch.rand(3, generator=gen).tolist(),
    )


def test_seed_everything_repeats_every_generator_and_only_its_seed():
    first = _draw(123)
    assert _draw(123) == first
    other = _draw(124)
    assert all(a != b for a, b in zip(other, first, strict=True))
    # the returned generator is its own stream: using the global one leaves it alone
    gen = seed_everything(123)
    torch.rand(100)
    assert torch.rand(3, generator=gen).tolist() == first[3]


def test_describe_environment_on_a_cpu_machine(monkeypatch):
    _pretend(monkeypatch)
    info = describe_environment()
    assert info == {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "device": "cpu",
        "BOOK_MODE": "smoke",  # conftest.py runs every test in smoke mode
    }


def test_describe_environment_names_the_gpu(monkeypatch):
    _pretend(monkeypatch, cuda=True)
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_520_809_984)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    info = describe_environment()
    assert info["device"] == "cuda"
    assert info["gpu"] == "NVIDIA H100 80GB HBM3, 79.6 GiB"
    assert info["bf16 supported"] == "True"
