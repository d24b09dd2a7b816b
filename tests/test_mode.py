import pytest

from shared.mode import by_mode, get_mode


@pytest.mark.parametrize("value", ["smoke", "laptop", "gpu", "  GPU ", "Laptop"])
def test_valid_modes(monkeypatch, value):
    monkeypatch.setenv("BOOK_MODE", value)
    assert get_mode() == value.strip().lower()


def test_default_is_laptop(monkeypatch):
    monkeypatch.delenv("BOOK_MODE", raising=False)
    assert get_mode() == "laptop"
    monkeypatch.setenv("BOOK_MODE", "")
    assert get_mode() == "laptop"


@pytest.mark.parametrize("value", ["fast", "cpu", "smoke-test", "0"])
def test_invalid_mode_is_rejected_clearly(monkeypatch, value):
    monkeypatch.setenv("BOOK_MODE", value)
    with pytest.raises(ValueError, match="smoke, laptop, gpu"):
        get_mode()


def test_by_mode_picks_value(monkeypatch):
    monkeypatch.setenv("BOOK_MODE", "smoke")
    assert by_mode(smoke=1, laptop=2, gpu=3) == 1
    monkeypatch.setenv("BOOK_MODE", "gpu")
    assert by_mode(smoke=1, laptop=2, gpu=3) == 3
    assert by_mode(smoke=1, laptop=2) == 2  # gpu falls back to laptop


def test_test_run_is_in_smoke_mode():
    # conftest.py forces smoke mode so notebooks under nbval run small
    assert get_mode() == "smoke"
