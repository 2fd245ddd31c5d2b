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


def level_widths(state: Mapping[str, torch.Tensor], key: str, levels: int, base: int, source: str, what: str) -> list[int]:
    """Channel multipliers ``width_i / base`` from the first dimension of ``key.format(i)``, i < levels."""
    widths = [int(shape(state, key.format(i), source, what)[0]) for i in range(levels)]
    if any(width % base for width in widths):
        raise VistokError(f"{source} has level widths {widths} that are not multiples of the base width {base}; pass an unmodified {what} checkpoint.")
    return [width // base for width in widths]


def matching_preset(presets: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any], default: str) -> str:
    """The preset whose every setting equals ``settings`` (e.g. "vq16" for the released VQ-16), else ``default``.

    The preset is a label here: the converter passes every setting explicitly as an override.
    """
    return next((name for name, preset in presets.items() if all(settings.get(k) == v for k, v in preset.items())), default)
