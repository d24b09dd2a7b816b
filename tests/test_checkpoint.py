"""Checkpoints and interrupts: a run stopped anywhere resumes bit for bit (CPU).

Each interrupt test trains the tiny model (with dropout, so the global RNG matters,
and two micro-batches per step, so the sampler moves inside a step) once without
interruption, then again with a real ``KeyboardInterrupt`` raised at one point,
resumes from the checkpoint, and compares every loss and every final weight.
"""

from __future__ import annotations

import errno
import json
import pathlib

import pytest
import torch
from tiny_lm import T, make_cfg, make_data, make_model
from torch.optim.optimizer import register_optimizer_step_post_hook

import shared.checkpoint as checkpoint
from shared.checkpoint import (
    CheckpointError,
    checkpoint_folder,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from shared.dataset import BatchSampler
from shared.train import TrainConfig, configure_optimizer, train

CFG = make_cfg(max_steps=20, grad_accum_steps=2, eval_interval=5)


def run(model, **kw):
    return train(model, make_data(), make_data(seed=1), CFG, progress=False, **kw)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run: its history and final weights."""
    model = make_model()
    hist = run(model)
    return hist, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_run(hist, model, reference):
    ref_hist, ref_weights = reference
    assert [r["loss"] for r in hist["train"]] == [r["loss"] for r in ref_hist["train"]]
    assert [r["grad_norm"] for r in hist["train"]] == [
        r["grad_norm"] for r in ref_hist["train"]
    ]
    assert [e["val_loss"] for e in hist["eval"]] == [
        e["val_loss"] for e in ref_hist["eval"]
    ]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref_weights[name]), name  # bit for bit


def resume(ckpt):
    torch.manual_seed(999)  # disturb the process RNG: the checkpoint must restore it
    model = make_model(seed=5)  # other weights: the checkpoint must replace them
    hist = run(model, checkpoint_dir=ckpt, resume=True)
    return hist, model


class Interrupt:
    """Raise KeyboardInterrupt at the n-th call (then never again)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


# forward calls: each evaluation makes 4 (2 splits x eval_iters 2), each step 2 (two
# micro-batches): calls 1-4 evaluate step 0, 5-14 are steps 1-5, 15-18 evaluate step 5.
# So 5, 9 and 30 land in a first micro-batch, 6 in a second, 16 and 17 in evaluations
@pytest.mark.parametrize("nth_forward", [5, 6, 9, 16, 17, 30])
def test_interrupt_in_the_forward_pass_resumes_exactly(
    tmp_path, reference, nth_forward
):
    model = make_model()
    model.register_forward_pre_hook(Interrupt(nth_forward))
    with pytest.raises(KeyboardInterrupt):
        run(model, checkpoint_dir=tmp_path)
    assert_same_run(*resume(tmp_path), reference)


@pytest.mark.parametrize("nth_update", [1, 7, 10])
def test_interrupt_after_the_optimizer_step_resumes_exactly(
    tmp_path, reference, nth_update
):
    # the hook runs after optimizer.step() has updated every weight, but before the
    # loop counts the step: the old code saved these weights as the previous step's
    handle = register_optimizer_step_post_hook(Interrupt(nth_update))
    try:
        model = make_model()
        with pytest.raises(KeyboardInterrupt):
            run(model, checkpoint_dir=tmp_path)
    finally:
        handle.remove()
    assert_same_run(*resume(tmp_path), reference)


@pytest.mark.parametrize("nth_save", [2, 3])
def test_interrupt_during_a_save_resumes_exactly(
    tmp_path, reference, monkeypatch, nth_save
):
    # torch.save writes state.pt after model.safetensors: a half-written checkpoint
    monkeypatch.setattr(checkpoint.torch, "save", _failing(torch.save, nth_save))
    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        run(model, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*")), "a half-written folder was left"
    assert_same_run(*resume(tmp_path), reference)


def _failing(fn, n):
    interrupt = Interrupt(n)

    def wrapped(*args, **kwargs):
        interrupt()
        return fn(*args, **kwargs)

    return wrapped


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model()
    save_checkpoint(tmp_path, model, None, 3)
    before = checkpoint_folder(tmp_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(checkpoint.torch, "save", _failing(torch.save, 1))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, None, 4)
    assert checkpoint_folder(tmp_path) == before
    other = make_model(seed=3)
    assert load_checkpoint(tmp_path, other)["step"] == 3
    for name, value in other.state_dict().items():
        assert torch.equal(value, weights[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", before.name]


def test_latest_wins_over_stray_files_and_a_step_folder_loads_directly(tmp_path):
    old, new = make_model(seed=1), make_model(seed=2)
    stray = save_checkpoint(tmp_path / "elsewhere", old, None, 7)
    for f in stray.iterdir():  # files of some older checkpoint lying in the root
        f.rename(tmp_path / f.name)
    folder = save_checkpoint(tmp_path, new, None, 9)
    assert load_checkpoint(tmp_path, make_model())["step"] == 9
    assert load_checkpoint(folder, make_model())["step"] == 9
    with pytest.raises(CheckpointError, match="names step-000007, which is incomplete"):
        load_checkpoint(tmp_path / "elsewhere", make_model())  # its files moved away
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing", make_model())


def test_only_the_latest_checkpoint_is_kept(tmp_path):
    model = make_model()
    for step in (1, 2, 3):
        folder = save_checkpoint(tmp_path, model, None, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", folder.name]
    assert json.loads((folder / "checkpoint.json").read_text())["step"] == 3


def test_resuming_with_other_training_settings_is_refused(tmp_path):
    run(make_model(), checkpoint_dir=tmp_path, stop_at=6)
    changed = TrainConfig(**{**CFG.to_dict(), "lr": 1e-2, "seed": 8})
    with pytest.raises(CheckpointError, match=r"lr: 0.003 -> 0.01; seed: 7 -> 8"):
        train(make_model(), make_data(), make_data(seed=1), changed,
              checkpoint_dir=tmp_path, resume=True, progress=False)  # fmt: skip
    # the hint names the scripts' flag and the Python argument, both as spelled
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path, make_model(), train_config=changed)
    assert "--allow-config-change" in str(refused.value)
    assert "allow_config_change=True" in str(refused.value)
    # evaluation and logging settings do not change the run
    relogged = TrainConfig(**{**CFG.to_dict(), "log_interval": 1, "eval_iters": 3})
    hist = train(make_model(), make_data(), make_data(seed=1), relogged,
                 checkpoint_dir=tmp_path, resume=True, progress=False)  # fmt: skip
    assert hist["train"][-1]["step"] == CFG.max_steps
    # and the caller may insist
    longer = TrainConfig(**{**CFG.to_dict(), "max_steps": 24})
    hist = train(make_model(), make_data(), make_data(seed=1), longer,
                 checkpoint_dir=tmp_path, resume=True, allow_config_change=True,
                 progress=False)  # fmt: skip
    assert hist["train"][-1]["step"] == 24


def test_weight_neutral_config_fields_do_not_block_loading(tmp_path):
    save_checkpoint(tmp_path, make_model(dropout=0.1), None, 0)
    load_checkpoint(tmp_path, make_model(dropout=0.0))  # dropout: same weights
    with pytest.raises(CheckpointError, match=r"different model config.*n_embd"):
        load_checkpoint(tmp_path, make_model(n_embd=32))


def test_gpt_checkpoint_loads_across_attention_impl_and_new_defaults(tmp_path):
    from shared.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, n_embd=16)
    folder = save_checkpoint(tmp_path, GPT(cfg), None, 0)
    meta = json.loads((folder / "checkpoint.json").read_text())
    del meta["model_config"]["rope_base"]  # as written before the field existed
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    explicit = GPTConfig(**{**cfg.__dict__, "attn_impl": "explicit", "dropout": 0.2})
    load_checkpoint(tmp_path, GPT(explicit))
    with pytest.raises(CheckpointError, match="rope_base: 10000.0 -> 500.0"):
        load_checkpoint(
            tmp_path, GPT(GPTConfig(**{**cfg.__dict__, "rope_base": 500.0}))
        )


def test_checkpoint_round_trip_restores_weights_and_sampler(tmp_path):
    model = make_model()
    opt = configure_optimizer(model, make_cfg())
    sampler = BatchSampler(make_data(), 4, T, seed=3)
    sampler.next()
    save_checkpoint(tmp_path, model, opt, 1, train_config=make_cfg(), sampler=sampler)
    expected = sampler.next()
    other = make_model(seed=1)
    opt2 = configure_optimizer(other, make_cfg())
    sampler2 = BatchSampler(make_data(), 4, T, seed=99)
    meta = load_checkpoint(tmp_path, other, opt2, sampler=sampler2)
    assert (
        meta["step"] == 1 and TrainConfig.from_dict(meta["train_config"]) == make_cfg()
    )
    for a, b in zip(
        model.state_dict().values(), other.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    got = sampler2.next()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_pickle_payload_is_refused(tmp_path):
    model = make_model()
    folder = save_checkpoint(tmp_path, model, None, 0)

    class Evil:
        def __reduce__(self):
            return (exec, ("import builtins; builtins._pwned = True",))

    torch.save({"torch_rng": torch.get_rng_state(), "x": Evil()}, folder / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(tmp_path, model)
    import builtins

    assert not hasattr(builtins, "_pwned")


def test_weights_are_safetensors(tmp_path):
    from safetensors import safe_open

    folder = save_checkpoint(tmp_path, make_model(), None, 0)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "wte.weight" in f.keys() or "head.weight" in f.keys()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_name_the_file_and_the_remedy(tmp_path, damage):
    model = make_model()
    folder = save_checkpoint(tmp_path, model, None, 0)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged.*delete"):
        load_checkpoint(tmp_path, model)
    with pytest.raises(CheckpointError, match="git checkout"):
        load_weights(model, file, "restore it with git checkout")


# ------------------------------------------------------------------------ nothing lost


def test_a_stale_temporary_folder_of_a_killed_save_does_not_block_the_resume(tmp_path):
    run(make_model(), checkpoint_dir=tmp_path, stop_at=16)
    # a save of step 20 killed (SIGKILL) half-way left its temporary folder behind
    stale = tmp_path / ".tmp-step-000020"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    (stale / "stray").write_bytes(b"")
    hist = run(make_model(seed=5), checkpoint_dir=tmp_path, resume=True)
    assert hist["train"][-1]["step"] == CFG.max_steps == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000020"]
    saved = sorted(p.name for p in (tmp_path / "step-000020").iterdir())
    assert saved == ["checkpoint.json", "model.safetensors", "state.pt"]
    assert load_checkpoint(tmp_path, make_model())["step"] == 20


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous(
    tmp_path, monkeypatch
):
    model = make_model()
    before = save_checkpoint(tmp_path, model, None, 3)
    real_torch_save, real_write_bytes = torch.save, pathlib.Path.write_bytes

    def torch_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, pathlib.Path)):
            return real_torch_save(obj, f, *args, **kwargs)  # into memory
        pathlib.Path(f).write_bytes(b"PK\x03\x04")  # what a full disk lets through
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    def write_bytes(path, data):
        if ".part-state.pt" in path.name:
            real_write_bytes(path, data[:100])
            _disk_full()
        return real_write_bytes(path, data)

    monkeypatch.setattr(checkpoint.torch, "save", torch_save)
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    with pytest.raises(OSError, match=r"no space left on .* while writing .*state\.pt"):
        save_checkpoint(tmp_path, model, None, 4)
    monkeypatch.undo()
    assert checkpoint_folder(tmp_path) == before
    assert load_checkpoint(tmp_path, make_model())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", before.name]


def test_a_full_disk_while_writing_the_weights_names_them(tmp_path, monkeypatch):
    model = make_model()
    save_checkpoint(tmp_path, model, None, 3)

    def save_model(model, filename, *args, **kwargs):
        pathlib.Path(filename).write_bytes(b"\0" * 10)
        raise Exception("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", save_model)
    with pytest.raises(OSError) as full:
        save_checkpoint(tmp_path, model, None, 4)
    assert "model.safetensors" in str(full.value)
    assert str(full.value).startswith("no space left on ")
    assert load_checkpoint(tmp_path, make_model())["step"] == 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text, meta: "{not json", r"checkpoint\.json is not valid JSON"),
        (lambda text, meta: meta.pop("step"), r"checkpoint\.json lacks the key 'step'"),
        (
            lambda text, meta: meta.update(stepp=3),
            r"checkpoint\.json has an unknown key 'stepp'",
        ),
        (
            lambda text, meta: meta["model_config"].update(n_emb=24),
            r"checkpoint\.json: 'model_config' has an unknown field 'n_emb'",
        ),
        (
            lambda text, meta: meta["train_config"].update(learning_rate=1),
            r"checkpoint\.json: 'train_config' has an unknown field 'learning_rate'",
        ),
    ],
    ids=[
        "invalid-json",
        "missing-key",
        "unknown-key",
        "unknown-model-field",
        "unknown-train-field",
    ],  # fmt: skip
)
def test_a_damaged_checkpoint_json_names_the_file_and_the_key(tmp_path, edit, message):
    run(make_model(), checkpoint_dir=tmp_path, stop_at=5)
    file = checkpoint_folder(tmp_path) / "checkpoint.json"
    meta = json.loads(file.read_text())
    changed = edit(file.read_text(), meta)
    file.write_text(changed if isinstance(changed, str) else json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as refused:
        run(make_model(), checkpoint_dir=tmp_path, resume=True)
    assert str(file) in str(refused.value)


def test_weights_of_another_shape_say_which_tensor_differs(tmp_path):
    folder = save_checkpoint(tmp_path, make_model(), None, 0)
    other = make_model(n_embd=32)
    with pytest.raises(CheckpointError) as refused:
        load_weights(other, folder / "model.safetensors", "retrain it")
    message = str(refused.value)
    assert "wte.weight has shape (37, 24) in the file, (37, 32) in the model" in message
    assert "damaged" not in message and "retrain it" in message
