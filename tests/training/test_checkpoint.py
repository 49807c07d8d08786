"""Checkpoints: atomic (a crash mid-write keeps the previous one), exact state round trips, EMA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from genxai.training import checkpoint
from genxai.training.ema import EMA


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _save(root, step, model, optimizer, keep=None):
    tmp = checkpoint.begin(root, step)
    checkpoint.write_weights(tmp, "model", model.state_dict())
    checkpoint.write_state(tmp, "state", {"step": step, "optimizer": optimizer.state_dict()})
    return checkpoint.commit(tmp, keep=keep)


def test_state_round_trip_is_exact(tmp_path):
    model, optimizer = _model_and_optimizer()
    random.random(), np.random.rand(), torch.rand(1)
    tree = {
        "rng": checkpoint.rng_state(),
        "optimizer": optimizer.state_dict(),
        3: (1, 2.5, None, "a"),
        "e": [],
    }
    checkpoint.write_state(tmp_path, "s", tree)
    back = checkpoint.read_state(tmp_path, "s")
    assert back[3] == (1, 2.5, None, "a") and back["e"] == []
    restored = torch.optim.Adam(model.parameters(), lr=1e-2)
    restored.load_state_dict(back["optimizer"])
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(restored.state_dict()["state"][key][name], value)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    checkpoint.set_rng_state(back["rng"])
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_latest_keep_and_overwrite(tmp_path):
    model, optimizer = _model_and_optimizer()
    for step in (5, 10, 15):
        _save(tmp_path, step, model, optimizer, keep=2)
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["ckpt-00000010", "ckpt-00000015"]
    assert checkpoint.checkpoint_step(checkpoint.latest(tmp_path)) == 15
    _save(tmp_path, 15, model, optimizer, keep=2)  # the same step again replaces it
    assert checkpoint.checkpoint_step(checkpoint.latest(tmp_path)) == 15
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint.checkpoint_step(tmp_path / "other")


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    good = _save(tmp_path, 1, model, optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(path, data):  # half a file on disk, then the process "dies"
        path.with_name(path.name + ".partial").write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed mid-write")

    tmp = checkpoint.begin(tmp_path, 2)
    checkpoint.write_weights(tmp, "model", model.state_dict())
    monkeypatch.setattr(checkpoint, "_atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_state(tmp, "state", {"optimizer": optimizer.state_dict()})
    monkeypatch.undo()

    assert checkpoint.latest(tmp_path) == good  # the unfinished folder is not a checkpoint
    weights = checkpoint.read_weights(good, "model")
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    assert checkpoint.read_state(good, "state")["step"] == 1
    assert checkpoint.checkpoint_step(_save(tmp_path, 2, model, optimizer)) == 2  # a retry succeeds


def test_unknown_types_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store a object"):
        checkpoint.write_state(tmp_path, "s", {"x": object()})
    with pytest.raises(FileNotFoundError, match=r"no missing\.json"):
        checkpoint.read_state(tmp_path, "missing")


def test_ema_average_and_warmup():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 3), 0.1))
    assert not any(p.requires_grad for p in ema.module.parameters())
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    warm.update(model)
    assert warm.num_updates == 1
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
