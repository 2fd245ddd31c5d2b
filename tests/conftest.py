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
