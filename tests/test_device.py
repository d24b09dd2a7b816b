import random

import numpy as np
import pytest
import torch

from shared.device import describe_environment, get_device, seed_everything


def test_get_device_returns_an_available_device(monkeypatch):
    monkeypatch.delenv("BOOK_DEVICE", raising=False)
    device = get_device()
    torch.zeros(2, device=device)  # it must be usable
    if torch.cuda.is_available():
        assert device.type == "cuda"


def test_forced_cpu(monkeypatch):
    monkeypatch.setenv("BOOK_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    assert get_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_unavailable_cuda_is_an_error(monkeypatch):
    with pytest.raises(RuntimeError, match="CUDA is not available.*available: cpu"):
        get_device("cuda")
    monkeypatch.setenv("BOOK_DEVICE", "cuda:1")
    with pytest.raises(RuntimeError, match="BOOK_DEVICE='cuda:1'"):
        get_device()


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", "cpu0"])
def test_bad_book_device_names_the_variable_and_the_choices(monkeypatch, bad):
    monkeypatch.setenv("BOOK_DEVICE", bad)
    with pytest.raises(ValueError, match=r"BOOK_DEVICE=.*use one of cpu, cuda, mps"):
        get_device()


def test_seed_everything_repeats_all_generators():
    def draw():
        gen = seed_everything(123)
        return (
            random.random(),
            np.random.rand(),
            torch.rand(3).tolist(),
            torch.rand(3, generator=gen).tolist(),
        )

    assert draw() == draw()
    seed_everything(124)
    assert torch.rand(1).item() != (seed_everything(123), torch.rand(1).item())[1]


def test_describe_environment_has_the_essentials():
    info = describe_environment()
    for key in ("python", "torch", "device", "cpu cores", "BOOK_MODE"):
        assert info[key]
    assert info["torch"] == torch.__version__
