"""The one place a device name from a user (``--device``, a bench argument) becomes a ``torch.device``."""
from __future__ import annotations

import torch

from vistok.tokenizers.errors import VistokError


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """``None`` or ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises VistokError, naming ``flag``, for anything else, for CUDA on a machine without it and
    for a GPU index that is not visible.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise VistokError(f"{flag} {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise VistokError(f"{flag} {name!r} is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VistokError(f"{flag} {name} asks for CUDA, but PyTorch sees no CUDA device on this machine; use {flag} cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise VistokError(f"{flag} {name} names GPU {device.index}, but only {count} are visible; use cuda:0 to cuda:{count - 1}.")
    return device
