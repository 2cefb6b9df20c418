"""SIGKILL at any instant, including in the middle of a checkpoint write: the killed run leaves only complete files,
and ``resume`` continues from the last complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from tests.forked_python import start_python
from tests.helpers import COMMON, ROOT, overrides_for, run_bundle

STAGE1 = [COMMON, "configs/train_autoencoder.json"]
CHECKPOINT = "checkpoint_autoencoder.pt"


def _command(overrides: dict) -> list[str]:
    files = json.dumps(STAGE1).replace('"', "'")
    args = ["-m", "monai.bundle", "run", "--config_file", files]
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return args


def _temporaries(models: Path) -> list[Path]:
    return [p for p in models.glob(".*") if p.is_file()] if models.is_dir() else []


def _kill_when(overrides: dict, tmp: Path, ready, name: str) -> str:
    """Start stage-1 training, SIGKILL it as soon as ``ready(models)`` holds; its output."""
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    process = start_python(_command(overrides), ROOT, {**os.environ, "PYTHONWARNINGS": "ignore"}, out, err)
    models = Path(overrides["ckpt_dir"])
    deadline = time.monotonic() + 240
    try:
        while not ready(models):
            assert process.is_alive(), f"{name} ended before it was killed:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} never reached the moment to kill it"
            time.sleep(0.0005)
    finally:
        process.kill()  # SIGKILL
        process.join()
    return out.read_text()


def assert_complete(models: Path) -> int:
    """Every file under its final name is complete (loads); returns the checkpoint's completed epochs."""
    for path in models.glob("*.pt"):
        if not path.name.startswith("."):  # a temporary file a kill left is not a result
            torch.load(path, weights_only=True)
    return torch.load(models / CHECKPOINT, weights_only=True)["engine"]["epoch"]


def test_sigkill_at_any_instant_then_resume(tmp_path):
    rng = random.Random(16)
    ov = overrides_for(tmp_path, max_epochs=40, val_interval=1, save_interval=1, train_batch_size=2, amp=False)
    models = tmp_path / "models"

    # 1. during a checkpoint write, once a complete checkpoint exists: the temporary file is there, not renamed yet
    def writing(m):
        return (m / CHECKPOINT).is_file() and any(p.name.startswith(".checkpoint") for p in _temporaries(m))

    _kill_when(ov, tmp_path, writing, "killed_writing")
    left = _temporaries(models)
    assert left, "the kill was meant to land while a checkpoint was written"
    epoch = assert_complete(models)

    # 2. resumed, then killed at a random moment (seeded) after the resume; the leftover temporary was removed
    delay = rng.uniform(0.2, 2.5)
    started: list[float] = []

    def later(m):
        if not started and not _temporaries(m):
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > delay

    out = _kill_when({**ov, "resume": True}, tmp_path, later, "killed_at_random")
    assert f"resumed from {models / CHECKPOINT}: epoch {epoch}," in out
    assert not any(p in _temporaries(models) for p in left)
    epoch = assert_complete(models)

    # 3. the last resume finishes from the last complete checkpoint
    proc = run_bundle(STAGE1, {**ov, "resume": True, "max_epochs": epoch + 1, "val_interval": 100})
    assert f"resumed from {models / CHECKPOINT}: epoch {epoch}," in proc.stdout
    assert assert_complete(models) == epoch + 1 and not _temporaries(models)
    print(f"killed while writing, then after {delay:.2f} s; resumed from epoch {epoch}", file=sys.stderr)
