"""Fine-tuning from weights: the ``init_from`` and ``freeze`` settings of configs/train.yaml.

``init_from=PATH`` starts a run from the weights at PATH: a vistok export (including one written
by ``vistok import``) or a training checkpoint (its EMA weights, the ones ``vistok export`` writes).
The optimizer, the learning-rate schedule and the step count start fresh; that is what sets it
apart from ``resume``, which continues a run. The architecture is the one stored with the weights,
so the ``model`` and ``quantizer`` groups do not apply (the run logs this).

``freeze=[encoder, quantizer]`` (any of ``encoder``, ``quantizer``, ``decoder``) trains the other
parts only: frozen parts get ``requires_grad=False`` (so the optimizer never sees them) and are
put in eval mode, so that training-time state updates (a VQ codebook's moving averages, dead-code
restarts, dropout) leave them exactly as loaded. Lightning restores each submodule's mode after
validation, so they stay in eval mode for the whole run. Decoder-only fine-tuning
(``freeze=[encoder, quantizer]``) is the usual domain-adaptation recipe and TiTok's stage 2.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vistok.tokenizers.errors import VistokError

PARTS = ("encoder", "quantizer", "decoder")


@dataclass
class InitialWeights:
    """Weights to start from: ``config`` (build_tokenizer kwargs) and ``state`` (the tokenizer's state dict)."""

    path: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]


def read_initial_weights(path: str | os.PathLike) -> InitialWeights:
    """Read ``init_from``: an export directory or a training ``.ckpt`` (through ``vistok.load``'s checks)."""
    from vistok.tokenizers.export import load

    tokenizer = load(path)
    return InitialWeights(str(path), tokenizer.config, tokenizer.state_dict())


def check_freeze(parts: Sequence[str] | None) -> list[str]:
    """The validated list of parts to freeze (VistokError for unknown names or all three)."""
    if parts is None:
        return []
    if isinstance(parts, str) or not isinstance(parts, Sequence):
        raise VistokError(f"freeze must be a list of parts such as [encoder, quantizer], got {parts!r}.")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise VistokError(f"freeze names {unknown[0]!r}, which is not a part of the tokenizer; list any of {', '.join(PARTS)}.")
    if set(parts) == set(PARTS):
        raise VistokError("freeze lists every part (encoder, quantizer, decoder), which leaves nothing to train; remove at least one.")
    return [p for p in PARTS if p in parts]


def freeze(tokenizer: nn.Module, parts: Sequence[str]) -> None:
    """Stop training ``parts`` of ``tokenizer``: no gradients, eval mode (see the module docstring)."""
    for name in check_freeze(parts):
        part = getattr(tokenizer, name)
        part.requires_grad_(False)
        part.eval()


def prepare(module: Any, initial: InitialWeights | None, parts: Sequence[str] | None) -> None:
    """Load ``initial`` into a freshly built TokenizerModule (its tokenizer and EMA copy), then freeze ``parts``."""
    parts = check_freeze(parts)
    if "decoder" in parts and module.discriminator is not None and module.loss_settings.adversarial.adaptive:
        raise VistokError("freeze includes the decoder, but the adaptive GAN weight needs gradients at the decoder's last layer; "
                          "set loss.adversarial.adaptive=false or train the decoder.")
    if initial is not None:
        module.tokenizer.load_state_dict(initial.state, strict=True)
        if module.ema is not None:
            # the average starts at the initial weights, not at the random ones it was copied from
            module.ema.module.load_state_dict(initial.state, strict=True)
    freeze(module.tokenizer, parts)
    if parts:
        # Lightning warns about every module in eval mode when training starts; here that is the point
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
