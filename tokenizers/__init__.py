"""vistok's tokenizers: encoders, quantizers, token dropout and decoders, and the training side.

The top-level names are resolved lazily so that ``import tokenizers.errors`` (used by the command
line before it knows which subcommand runs) does not pay for torch and the model code.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VistokError": "tokenizers.errors",
    "ImageTokenizer": "tokenizers.model",
    "TokenizerOutput": "tokenizers.model",
    "build_tokenizer": "tokenizers.model",
    "PRESETS": "tokenizers.model",
    "TailTokenDropout": "tokenizers.token_dropout",
    "load": "tokenizers.export",
    "export_checkpoint": "tokenizers.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenizers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
