"""``vistok import FORMAT SRC OUT``: released tokenizers of other projects as vistok exports.

FORMATS maps a format name to the module that converts it. A converter module exposes:

- ``REPOSITORY``: the original project's URL (recorded in config.json and the model card);
- ``add_arguments(parser: argparse.ArgumentParser) -> None``: its format-specific flags (architecture
  overrides where the file cannot tell, e.g. ``--heads`` for TiTok);
- ``convert(src: pathlib.Path, args: argparse.Namespace) -> common.Imported``: read SRC as the
  project publishes it (every file through ``common.read_weights`` / ``read_json``, i.e.
  ``weights_only=True``), infer the architecture from shapes and config, rename the keys with
  ``common.rename_keys`` (unknown keys refused by name), build the model with ``build_tokenizer``
  and fill it with ``common.load_weights`` (missing / mis-shaped tensors refused by name).

Bad input raises ``VistokError`` (one sentence; the command line exits 2). ``common.write_import``
writes the result like ``vistok export`` does, plus the source and a licence note.
From Python, :func:`import_tokenizer` runs a converter with flags given as keyword arguments.
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from vistok.tokenizers.errors import VistokError

FORMATS: dict[str, tuple[str, str]] = {
    "titok": ("vistok.tokenizers.imports.titok", "TiTok (bytedance/1d-tokenizer): a folder with config.json and model.safetensors / pytorch_model.bin, or a state dict with --config"),
    "llamagen": ("vistok.tokenizers.imports.llamagen", "LlamaGen VQ (FoundationVision/LlamaGen): a .pt holding 'model' and optionally 'ema'"),
    "open-magvit2": ("vistok.tokenizers.imports.open_magvit2", "Open-MAGVIT2 (TencentARC/SEED-Voken): a Lightning .ckpt with model_ema.* copies"),
}


def converter(fmt: str) -> ModuleType:
    """The converter module of format ``fmt``."""
    if fmt not in FORMATS:
        raise VistokError(f"unknown import format {fmt!r}; use one of {', '.join(FORMATS)}.")
    return importlib.import_module(FORMATS[fmt][0])


def import_tokenizer(fmt: str, src: str | os.PathLike, **options: Any):
    """Convert ``src`` of format ``fmt``; ``options`` are the format's flags by their dest names
    (e.g. ``heads=4``). Returns a ``common.Imported``."""
    module = converter(fmt)
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args([])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise VistokError(f"unknown option(s) {', '.join(unknown)} for the {fmt} import; its options are {', '.join(sorted(vars(args)))}.")
    for key, value in options.items():
        setattr(args, key, value)
    return module.convert(Path(src), args)
