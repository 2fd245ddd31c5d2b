"""Reading an architecture from a state dict's key names and tensor shapes (for formats without a config)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vistok.tokenizers.errors import VistokError


def count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive indices i = 0, 1, ... with some key starting ``f"{prefix}{i}."``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    n = 0
    while n in found:
        n += 1
    return n


def shape(state: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> torch.Size:
    """The shape of ``state[key]``, or VistokError naming the key and ``what`` to pass instead."""
    if key not in state:
        raise VistokError(f"{source} lacks '{key}', which every {what} has; pass {what} checkpoint.")
    return state[key].shape


def conv_layout(state: Mapping[str, torch.Tensor], levels: str, blocks: str, source: str, what: str) -> dict[str, Any]:
    """``channels``, ``channel_mult`` and ``num_res_blocks`` of a VQGAN-style encoder from its key names and shapes.

    The encoder's input convolution is ``encoder.conv_in``; level i's ResNet block j lives at
    ``f"{levels}.{i}.{blocks}.{j}"`` (e.g. levels="encoder.down", blocks="block"), its first
    convolution's output width being level i's width.
    """
    channels = int(shape(state, "encoder.conv_in.weight", source, what)[0])
    num_levels = count(state, f"{levels}.")
    num_blocks = count(state, f"{levels}.0.{blocks}.")
    if num_levels < 1 or num_blocks < 1:
        raise VistokError(f"{source} has no {levels}.0.{blocks}.0 tensors; pass {what} checkpoint.")
    widths = [int(shape(state, f"{levels}.{i}.{blocks}.0.conv1.weight", source, what)[0]) for i in range(num_levels)]
    if any(width % channels for width in widths):
        raise VistokError(f"{source} has level widths {widths} that are not multiples of the base width {channels}; pass an unmodified {what} checkpoint.")
    return {"channels": channels, "channel_mult": [width // channels for width in widths], "num_res_blocks": num_blocks}


def matching_preset(presets: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any], default: str) -> str:
    """The preset whose every setting equals ``settings`` (e.g. "vq16" for the released VQ-16), else ``default``.

    The preset is a label here: the converter passes every setting explicitly as an override.
    """
    return next((name for name, preset in presets.items() if all(settings.get(k) == v for k, v in preset.items())), default)
