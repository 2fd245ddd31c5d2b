"""vistok: train, evaluate and export visual tokenizers.

The package's folders are the repository's top-level folders:

- ``vistok.tokenizers``: the model core (encoders, quantizers, token dropout, decoders,
  ``ImageTokenizer``, export and load), pure torch; ``vistok.tokenizers.training`` wraps it for
  Lightning (module, losses, callbacks, SLURM, run assembly);
- ``vistok.data``: webdataset shards in and out, and the embedded sample photographs;
- ``vistok.eval``: metrics, rate-distortion, ``vistok score``, and the speed benchmark;
- ``vistok.train`` and ``vistok.cli``: ``vistok train`` and the other commands; ``configs/``
  ships inside the package.

The names below are imported on first use, so ``import vistok`` stays cheap (no torch)::

    import vistok
    tok = vistok.load("exports/titok-fsq")
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

_EXPORTS = {
    "VistokError": "vistok.tokenizers.errors",
    "ImageTokenizer": "vistok.tokenizers.model",
    "TokenizerOutput": "vistok.tokenizers.model",
    "build_tokenizer": "vistok.tokenizers.model",
    "PRESETS": "vistok.tokenizers.model",
    "TailTokenDropout": "vistok.tokenizers.token_dropout",
    "load": "vistok.tokenizers.export",
    "load_with_metadata": "vistok.tokenizers.export",
    "export_checkpoint": "vistok.tokenizers.export",
}

__all__ = sorted(_EXPORTS)


def hide_checkout(folder: str | os.PathLike | None = None) -> None:
    """Drop ``folder`` (default: this package's folder) from ``sys.path``.

    ``python -m vistok ...`` or ``python train.py`` run in an editable checkout's root put that
    folder first on ``sys.path``; its ``tokenizers/``, ``data/`` and ``eval/`` folders would then
    hide Hugging Face's ``tokenizers`` (which transformers and torchmetrics import) and any other
    package of those names. vistok's own entry points call this first; vistok itself is always
    imported as the ``vistok`` package, never from there.
    """
    folder = Path(folder if folder is not None else __file__).resolve()
    folder = folder.parent if folder.is_file() else folder
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != folder]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from vistok.tokenizers.export import vistok_version

        value: Any = vistok_version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'vistok' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
