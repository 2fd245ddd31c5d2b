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


def smooth_images(n: int, size: int = 16, seed: int = 0):
    """(n, 3, size, size) in [0, 1]: bilinear upsampled 2x2 colour grids, learnable from a few tokens."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 2, 2, generator=g), size=(size, size), mode="bilinear", align_corners=True)


@pytest.fixture(scope="session")
def fitted_tokenizer():
    """(tokenizer, images): a tiny FSQ TiTok (16 px, 8 tokens) fitted for a few seconds to 16 smooth
    images, so its tokens carry the images (PSNR about 30 dB at 8 tokens, 12-17 dB at 1-4)."""
    import torch
    import torch.nn.functional as F

    from vistok.tokenizers.model import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(image_size=16, num_tokens=8)
    images = smooth_images(16)
    # 300 steps at 1e-3: at 120 steps and 3e-3 the result hung on the initial draw (8-token PSNR from
    # 14 to 19 dB across seeds, some prefixes no better than shorter ones); this fits every seed tried
    opt = torch.optim.Adam(tokenizer.parameters(), lr=1e-3)
    for _ in range(300):
        out = tokenizer.train()(images)
        loss = F.mse_loss(out.reconstruction, images) + out.quantizer.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tokenizer.eval(), images


def save_checkpoint(tokenizer, path):
    """``path``: a checkpoint shaped like the training module's, holding ``tokenizer``'s weights."""
    import torch

    state = tokenizer.state_dict()
    torch.save({"hyper_parameters": {"tokenizer": tokenizer.config}, "state_dict": {f"tokenizer.{k}": v for k, v in state.items()},
                "ema_state_dict": state, "vistok": {"metrics": {}, "step": 0, "version": "test"}}, path)
    return path


def save_pngs(images, folder):
    """(N, 3, H, W) in [0, 1] -> folder/0.png ... (8-bit, so they load back exactly)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return folder


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
