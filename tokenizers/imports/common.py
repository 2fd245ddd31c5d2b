"""What every import format needs: safe reading, key mapping with strict checks, the export.

A converter reads the published files with :func:`read_weights` / :func:`read_json` (never
unpickling arbitrary objects), renames the original key names to vistok's with
:func:`rename_keys` (every source key must be claimed by a rule, else the import is refused
naming the keys), builds an :class:`~vistok.tokenizers.model.ImageTokenizer` with
``build_tokenizer``, fills it with :func:`load_weights` (missing or mis-shaped tensors are named)
and returns an :class:`Imported`. :func:`write_import` writes it as a standard vistok export
(model.safetensors + config.json + README.md) whose config.json and model card record the source
and that the weights' licence is their authors'.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vistok.tokenizers.errors import VistokError

# A rule maps source keys matching ``pattern`` (a full-match regular expression) to
# ``re.sub(pattern, replacement, key)``; ``transform`` (optional) reshapes the tensor on the way.
Rule = tuple[str, str] | tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]

SAFETENSORS_SUFFIXES = (".safetensors",)


@dataclass
class Imported:
    """A converted tokenizer and where it came from.

    tokenizer: the ImageTokenizer with the converted weights loaded (eval mode).
    source: recorded in config.json under ``"source"``: ``format`` (the FORMATS name), ``file``
        (the file or folder read), ``repository`` (the original project), ``weights`` (which copy:
        "ema" or "raw"), ``notes`` (list of sentences for the model card: what was inferred, what differs).
    """

    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def read_weights(path: str | os.PathLike, what: str = "a weights file") -> Any:
    """Read ``path``: a ``.safetensors`` file -> dict of tensors; anything else through
    ``torch.load(weights_only=True)`` -> whatever plain container it holds (a state dict, or a
    dict with "model", "ema", "state_dict", ...). Raises VistokError in one sentence for a missing,
    truncated or foreign file, and for one that would need arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise VistokError(f"{path} does not exist or is not a file; pass {what}.")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise VistokError(f"{path} is not a readable safetensors file ({_first_line(error)}); download it again.") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise VistokError(
            f"{path} holds Python objects that weights_only loading refuses ({_first_line(error)[:120]}), and vistok "
            f"never unpickles arbitrary objects; pass {what} that holds tensors only (or convert it to safetensors)."
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, OSError... for bad files
        raise VistokError(f"{path} is not a readable PyTorch file (truncated, corrupted or another kind of file: {_first_line(error)}); pass {what}.") from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``, or VistokError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise VistokError(f"{path} does not exist; pass the config.json published with the weights.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VistokError(f"{path} is not valid JSON ({_first_line(error)}); pass the config.json published with the weights.") from None
    if not isinstance(value, dict):
        raise VistokError(f"{path} is not a JSON object; pass the config.json published with the weights.")
    return value


def tensors_only(container: Any, where: str) -> dict[str, torch.Tensor]:
    """``container`` as a ``{name: tensor}`` dict, or VistokError when it is not one."""
    if not isinstance(container, Mapping) or not container:
        raise VistokError(f"{where} is not a state dict (a non-empty mapping of names to tensors); pass the published weights file.")
    bad = [str(k) for k, v in container.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise VistokError(f"{where} is not a plain state dict: entries {_names(bad)} are not tensors; pass the published weights file.")
    return dict(container)


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def rename_keys(state: Mapping[str, torch.Tensor], rules: Iterable[Rule], source: str, fmt: str) -> dict[str, torch.Tensor]:
    """Map original key names to vistok's. The first rule whose pattern full-matches a key wins.

    A key no rule claims is refused: VistokError names every such key (the file is not of the
    architecture the converter inferred, or of another format). ``source`` and ``fmt`` name the
    file and the format in that sentence.
    """
    compiled = [(re.compile(rule[0]), rule[1], rule[2] if len(rule) > 2 else None) for rule in rules]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        for pattern, replacement, transform in compiled:
            if pattern.fullmatch(key):
                new = pattern.sub(replacement, key)
                if new in out:
                    raise VistokError(f"{source} maps two tensors to '{new}' (one is '{key}'); pass a {fmt} file with each tensor once.")
                out[new] = transform(tensor) if transform is not None else tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise VistokError(
            f"{source} holds tensors that the {fmt} import does not know: {_names(unknown)}; pass an unmodified "
            f"{fmt} file of a supported architecture (see `vistok import {fmt} --help`)."
        )
    return out


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, fmt: str) -> None:
    """Copy ``state`` (vistok key names) into ``model``, strictly, in float32.

    Refuses, naming the tensors: keys the model lacks (unknown), keys the model needs that
    ``state`` lacks (missing) and shape mismatches (with both shapes).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing:
        raise VistokError(
            f"{source} lacks tensors the inferred {fmt} architecture needs: {_names(missing)} (vistok names); "
            "pass the complete file, or the flags that describe its architecture."
        )
    if unknown:
        raise VistokError(f"{source} holds tensors the inferred {fmt} architecture does not have: {_names(unknown)} (vistok names); check the architecture flags.")
    if mismatched:
        shapes = ", ".join(f"'{k}' {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(mismatched)[:4])
        raise VistokError(f"{source} does not fit the inferred {fmt} architecture: shapes differ for {shapes} (file vs model); check the architecture flags.")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    model.eval()


def write_import(imported: Imported, src: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write ``imported`` as a standard vistok export at ``out_dir`` (atomically), returning it.

    config.json holds what every export holds plus ``"source"`` (format, file, repository,
    weights, notes); the model card says where the weights come from and that their licence is
    their authors'.
    """
    from vistok.tokenizers.export import check_out_dir, describe_tokenizer, write_export

    out_dir = Path(out_dir)
    check_out_dir(out_dir, Path(src), force)
    model = imported.tokenizer
    source = {"format": "", "file": Path(src).name, "repository": "", "weights": "raw", "notes": [], **imported.source}
    config = {
        **describe_tokenizer(model, json.loads(json.dumps(model.config)), source["weights"]),
        "source": source,
        "metrics": {},
    }
    return write_export(model, config, out_dir)
