"""Shared test setup: deterministic, offline, CPU-only."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# `python -m pytest` in the checkout puts its root first on sys.path, where the tokenizers/ folder
# would hide Hugging Face's `tokenizers`; vistok is imported as the installed package instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

# Nothing in the suite may reach a network or a logged-in account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def make_cfg():
    """``make_cfg(*overrides)``: configs/train.yaml composed with Hydra's compose API, as ``vistok train`` would."""
    from hydra import compose, initialize_config_dir

    from vistok.tokenizers.training.settings import CONFIG_DIR

    def compose_train(*overrides: str):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return compose_train


@pytest.fixture
def run_with(monkeypatch):
    """``run_with(cfg, run_dir, *callbacks)``: run_training with extra Lightning callbacks appended
    (tests observe or interrupt the run through them); returns its TrainResult."""
    from vistok.tokenizers.training import run as training

    def run(cfg, run_dir, *callbacks):
        original = training.build_callbacks

        def patched(*args, **kwargs):
            built, artifacts = original(*args, **kwargs)
            return built + list(callbacks), artifacts

        with monkeypatch.context() as patch:
            patch.setattr(training, "build_callbacks", patched)
            return training.run_training(cfg, run_dir)

    return run
