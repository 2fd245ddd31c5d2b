"""From a training checkpoint to a standalone tokenizer directory, and back to a model.

An exported tokenizer is a directory holding three files:

    model.safetensors   the ImageTokenizer's state_dict (EMA weights by default) and nothing else:
                        no optimizer, discriminator or loss state
    config.json         what rebuilds it (the build_tokenizer keyword arguments), the sizes users
                        need (image size, maximum tokens, codebook size), the input convention,
                        the vistok and format versions, a checksum of the weights and the
                        validation metrics recorded in the checkpoint
    README.md           a short model card

Loading never unpickles arbitrary objects: weights come from safetensors, the config from JSON,
and training checkpoints go through ``torch.load(weights_only=True)``. The model is built only by
``build_tokenizer``, whose quantizer goes through the ``build_quantizer`` whitelist, so a config
cannot make us import anything.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vistok.tokenizers.atomic import atomic_path, check_writable, current_umask
from vistok.tokenizers.errors import VistokError

FORMAT_VERSION = 1
# Format versions this code can read; a newer export must be refused, not half-understood.
SUPPORTED_FORMAT_VERSIONS = (1,)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"

# How images must be given to the tokenizer and what comes back; recorded in config.json so a user
# far from this code base knows the convention without reading it.
INPUT_CONVENTION = {
    "images": "RGB float tensors (B, 3, H, W) in [0, 1]; the model maps them to [-1, 1] internally",
    "image_size": "H = W = image_size; `vistok encode` resizes the shorter side to image_size "
    "(bicubic) and center-crops",
    "reconstructions": "decode() returns (B, 3, H, W) floats clamped to [0, 1]; PNGs round them to 8 bits",
    "tokens": "encode() returns (B, k) int64 indices (discrete quantizers) or (B, k, token_dim) float "
    "codes (soft tokens); decode() accepts any prefix 1 <= k <= max_tokens",
}


# The training module's state_dict holds the tokenizer's weights under this prefix (its attribute name).
TOKENIZER_PREFIX = "tokenizer."
# torch.save writes a zip archive; files from before PyTorch 1.6 (and _use_new_zipfile_serialization=False) a pickle.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


@functools.cache
def vistok_version() -> str:
    """The installed vistok version, or "unknown" when running from an uninstalled tree.

    ``vistok.__version__``, ``vistok --version``, config.json and training checkpoints all read it here.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vistok")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class LoadedTokenizer:
    """A loaded tokenizer with what was recorded next to it.

    config: the exported config.json (for a training checkpoint: the same structure, built from it).
    metrics: validation metrics recorded at training time (may be empty).
    fingerprint: 16 hex digits identifying the architecture and the exact weights; tokens are only
        meaningful to a tokenizer with the same fingerprint.
    """

    tokenizer: Any  # ImageTokenizer; not annotated to keep this module importable before the model
    config: dict[str, Any]
    metrics: dict[str, Any]
    fingerprint: str
    source: Path


# --------------------------------------------------------------------------------------------
# Reading training checkpoints


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` whose key starts with ``prefix``, keyed without it."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def add_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Every entry of ``state`` keyed with ``prefix`` in front (the inverse of :func:`strip_prefix`)."""
    return {prefix + key: value for key, value in state.items()}


def _checkpoint_in(directory: Path) -> Path:
    """A checkpoint to suggest for a directory given where a .ckpt was expected."""
    for candidate in (directory / "last.ckpt", directory / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return candidate
    found = sorted(directory.glob("*.ckpt"))
    if found:
        return found[-1]
    return directory / "last.ckpt" if directory.name == "checkpoints" else directory / "checkpoints" / "last.ckpt"


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-sentence VistokErrors for a missing,
    empty, truncated or corrupted file, another kind of file, and a file holding arbitrary Python objects."""
    path = Path(path)
    if path.is_dir():
        raise VistokError(f"{path} is a directory, not a checkpoint file; pass a .ckpt file such as {_checkpoint_in(path)}.")
    if not path.is_file():
        raise VistokError(f"checkpoint {path} does not exist; pass the path of a .ckpt file written by train.py.")
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        what = "an empty file" if not head else "neither a zip archive nor a pickle, the two forms torch.save writes"
        raise VistokError(f"{path} is not a PyTorch checkpoint ({what}); pass a .ckpt written by train.py or an exported tokenizer directory.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VistokError(
            f"{path} is a PyTorch file holding Python objects other than tensors and plain values, which vistok "
            "never unpickles (torch.load(weights_only=True) refuses them); pass a checkpoint written by vistok's train.py."
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, OSError, KeyError... for bad files
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if len(detail) > 120:  # cut between words, never inside one
            detail = detail[:120].rsplit(" ", 1)[0] + " ..."
        raise VistokError(
            f"{path} is not a readable PyTorch checkpoint (it is truncated, corrupted or another kind of file: "
            f"{detail}); pass an intact .ckpt written by train.py."
        ) from None
    return ckpt


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a vistok training checkpoint with ``weights_only=True`` and check its layout.

    Raises VistokError for a missing, unreadable or corrupted file, a file that holds arbitrary
    Python objects, and a PyTorch checkpoint that was not written by vistok's training module.
    """
    ckpt = load_torch_file(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not (
        isinstance(hparams, dict)
        and isinstance(hparams.get("tokenizer"), dict)
        and isinstance(state, dict)
        and any(isinstance(k, str) and k.startswith(TOKENIZER_PREFIX) for k in state)
    ):
        raise VistokError(
            f"{path} is a PyTorch file but not a vistok training checkpoint (it lacks hyper_parameters['tokenizer'] "
            "or 'tokenizer.*' weights); pass a checkpoint written by train.py or an exported tokenizer directory."
        )
    return ckpt


def checkpoint_state_dict(
    ckpt: Mapping[str, Any], path: str | os.PathLike, use_ema: bool = True, fallback_to_raw: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """The tokenizer's weights in a checkpoint and which ones they are ("ema" or "raw").

    Only ``tokenizer.*`` entries of the raw state_dict are kept (the discriminator, LPIPS and
    other loss modules live beside it in the LightningModule and are not part of a tokenizer).
    Without an EMA copy, ``use_ema`` raises unless ``fallback_to_raw``.
    """
    if use_ema:
        ema = ckpt.get("ema_state_dict")
        if isinstance(ema, dict) and ema:
            return {k: v for k, v in ema.items() if isinstance(v, torch.Tensor)}, "ema"
        if not fallback_to_raw:
            raise VistokError(
                f"{path} holds no EMA weights (training ran without EMA); pass --no-ema (use_ema=False) to export the raw weights."
            )
    raw = {k: v for k, v in strip_prefix(ckpt["state_dict"], TOKENIZER_PREFIX).items() if isinstance(v, torch.Tensor)}
    return raw, "raw"


# --------------------------------------------------------------------------------------------
# Building and checking


def build_from_config(tokenizer_config: Any, where: str):
    """Build an ImageTokenizer from build_tokenizer keyword arguments read from a file.

    ``where`` names the file in the error sentence. Only build_tokenizer (and through it the
    build_quantizer whitelist) is ever called: no ``_target_`` is imported here.
    """
    from vistok.tokenizers.model import build_tokenizer

    if not isinstance(tokenizer_config, dict) or not all(isinstance(k, str) for k in tokenizer_config):
        raise VistokError(f"{where} has no tokenizer config (a JSON object of build_tokenizer arguments); re-export the checkpoint.")
    try:
        return build_tokenizer(**tokenizer_config)
    except VistokError as error:
        raise VistokError(f"{where} cannot be built: {error}") from None
    except Exception as error:  # any failure of a config read from disk is bad input, not a bug
        raise VistokError(
            f"{where} holds a tokenizer config that build_tokenizer rejects ({type(error).__name__}: {error}); "
            "restore the config that was exported with these weights or re-export the checkpoint."
        ) from None


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], weights: str, config: str) -> None:
    """Raise VistokError naming the first tensor where ``state`` does not fit ``model``.

    Checked in the model's own order (missing or differently shaped), then tensors the model
    does not have; ``weights`` and ``config`` name the two sources in the sentence.
    """
    fix = "restore the config that was written with these weights, or re-export the checkpoint."
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise VistokError(f"{config} does not match {weights}: tensor '{key}' of the model it builds is missing from the weights; {fix}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise VistokError(
                f"{config} does not match {weights}: tensor '{key}' has shape {tuple(state[key].shape)} in the weights "
                f"but {tuple(tensor.shape)} in the model the config builds; {fix}"
            )
    for key in state:
        if key not in expected:
            raise VistokError(f"{config} does not match {weights}: the weights hold tensor '{key}', which the model it builds does not have; {fix}")


def fingerprint(tokenizer: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over the tokenizer config and every tensor's name, dtype, shape and bytes.

    Computed from the model in memory, so a tokenizer loaded from its exported directory and from
    the training checkpoint it came from (same weights) have the same fingerprint.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(_legacy_spelling(getattr(tokenizer, "config", {})), sort_keys=True).encode())
    for key, tensor in sorted(tokenizer.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _legacy_spelling(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its quantizer target spelt as vistok 0.1 did (``tokenizers.quantizers.X``).

    Fingerprints hash this spelling, so a tokenizer keeps its fingerprint across the rename of the
    package to ``vistok`` and token files written before it still match their tokenizer.
    """
    from vistok.tokenizers.quantizers import LEGACY_PACKAGE, PACKAGE

    config = dict(config)
    quantizer = config.get("quantizer")
    if isinstance(quantizer, Mapping) and str(quantizer.get("_target_", "")).startswith(PACKAGE + "."):
        config["quantizer"] = {**quantizer, "_target_": LEGACY_PACKAGE + quantizer["_target_"][len(PACKAGE):]}
    return config


def _json_roundtrip(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise VistokError(f"{where} holds a tokenizer config that is not plain JSON ({error}); the training module must store plain values.") from None


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The dotted path of the first place two JSON values differ, or None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}{key}"
            found = _first_difference(a[key], b[key], f"{path}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (path.rstrip(".") or "(root)")


def _clean_metrics(metrics: Any) -> dict[str, Any]:
    """Recorded metrics as JSON-safe numbers (non-finite values become strings such as "nan")."""
    if not isinstance(metrics, dict):
        return {}
    clean: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            clean[str(name)] = float(value) if math.isfinite(value) else str(value)
    return clean


def describe_tokenizer(tokenizer, tokenizer_config: dict, weights_kind: str) -> dict[str, Any]:
    """The config.json fields every export has, whatever the weights came from."""
    return {
        "format_version": FORMAT_VERSION,
        "vistok_version": vistok_version(),
        "tokenizer": tokenizer_config,
        "arch": tokenizer.arch,
        "quantizer": str((tokenizer_config.get("quantizer") or {}).get("_target_", "")).rsplit(".", 1)[-1],
        "image_size": int(tokenizer.image_size),
        "max_tokens": int(tokenizer.max_tokens),
        "codebook_size": None if tokenizer.codebook_size is None else int(tokenizer.codebook_size),
        "token_dim": int(tokenizer.token_dim),
        "is_discrete": bool(tokenizer.is_discrete),
        "input": INPUT_CONVENTION,
        "weights": {
            "file": WEIGHTS_FILE,
            "kind": weights_kind,
            "num_parameters": int(sum(p.numel() for p in tokenizer.parameters())),
        },
    }


def describe(tokenizer, tokenizer_config: dict, weights_kind: str, ckpt: Mapping[str, Any], ckpt_path: Path) -> dict[str, Any]:
    """The config.json structure for ``tokenizer`` built from a training checkpoint."""
    record = ckpt.get("vistok") if isinstance(ckpt.get("vistok"), dict) else {}
    step = record.get("step", ckpt.get("global_step"))
    return {
        **describe_tokenizer(tokenizer, tokenizer_config, weights_kind),
        "training": {
            "checkpoint": ckpt_path.name,
            "step": int(step) if isinstance(step, (int, float)) else None,
            "vistok_version": str(record.get("version", "unknown")),
        },
        "metrics": _clean_metrics(record.get("metrics")),
    }


def tokenizer_from_checkpoint(path: Path, use_ema: bool = True, fallback_to_raw: bool = False) -> tuple[Any, dict[str, Any]]:
    """Read a training checkpoint and build its tokenizer with the chosen weights loaded.

    Returns (ImageTokenizer, its config.json structure from :func:`describe`). Everything that
    does not fit (the file, the config, a tensor) raises VistokError with one sentence;
    ``use_ema`` and ``fallback_to_raw`` as in :func:`checkpoint_state_dict`.
    """
    ckpt = read_checkpoint(path)
    state, kind = checkpoint_state_dict(ckpt, path, use_ema=use_ema, fallback_to_raw=fallback_to_raw)
    where = f"{path}'s hyper_parameters['tokenizer']"
    tokenizer_config = _json_roundtrip(ckpt["hyper_parameters"]["tokenizer"], where)
    model = build_from_config(tokenizer_config, where)
    check_state_dict(model, state, f"{path}'s {kind} weights", where)
    model.load_state_dict(state, strict=True)
    # The rebuilt model's own config: the checkpoint's, with vistok 0.1's quantizer targets spelt anew.
    return model, describe(model, _json_roundtrip(model.config, where), kind, ckpt, path)


# --------------------------------------------------------------------------------------------
# Export


def check_out_dir(out_dir: Path, ckpt_path: Path, force: bool) -> None:
    """Refuse a non-directory or (without ``force``) non-empty ``out_dir``, and one holding ``ckpt_path``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise VistokError(f"{out_dir} exists and is not a directory; choose a directory path for the export.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise VistokError(f"{out_dir} is not empty; pass --force (force=True) to replace its contents, or choose another directory.")
        # --force replaces the whole directory: never let that delete the checkpoint being exported.
        if out_dir.resolve() in ckpt_path.resolve().parents:
            raise VistokError(f"{out_dir} contains the checkpoint {ckpt_path} and --force would delete it; export to another directory.")
    check_writable(out_dir, "OUT_DIR")
    if out_dir.is_dir():  # replaced by a rename in its parent folder
        check_writable(out_dir.parent, "the folder holding OUT_DIR")


def _replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory ``new`` at ``target``; an existing ``target`` is moved aside first.

    Both renames stay on one file system (``new`` is created next to ``target``), so a reader sees
    the old directory or the complete new one, never a partial export.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(config: Mapping[str, Any]) -> str:
    """A short Markdown model card for an exported tokenizer (config.json's structure)."""
    tok = config["tokenizer"]
    quantizer = {k: v for k, v in (tok.get("quantizer") or {}).items() if k != "_target_"}
    quantizer_args = ", ".join(f"{k}={v}" for k, v in quantizer.items())
    codebook = (
        f"{config['codebook_size']:,} codes" if config["codebook_size"] is not None else f"soft tokens of dimension {config['token_dim']}"
    )
    training = config.get("training") or {}
    step = training.get("step")
    weights = f"{'EMA' if config['weights']['kind'] == 'ema' else 'raw (non-EMA)'} weights"
    source = config.get("source")
    if isinstance(source, Mapping):
        origin = (
            f"Imported with vistok {config['vistok_version']} (format version {config['format_version']}) from the "
            f"{source.get('format')} file `{source.get('file')}` of {source.get('repository')}, {weights}."
        )
    else:
        origin = (
            f"Exported with vistok {config['vistok_version']} (format version {config['format_version']}) from "
            f"`{training.get('checkpoint', '?')}`" + (f" at step {step}" if step is not None else "") + f", {weights}."
        )
    lines = [
        f"# vistok tokenizer: {config['arch']} / {config['quantizer']}",
        "",
        origin,
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {config['arch']}" + (f" (preset {tok['preset']})" if "preset" in tok else "") + " |",
        f"| quantizer | {config['quantizer']}" + (f" ({quantizer_args})" if quantizer_args else "") + " |",
        f"| codebook | {codebook} |",
        f"| tokens per image | up to {config['max_tokens']}; decode accepts any prefix |",
        f"| image size | {config['image_size']}x{config['image_size']} RGB |",
        f"| input | {config['input']['images']} |",
        f"| parameters | {config['weights']['num_parameters']:,} |",
        "",
        "## Validation metrics recorded in the checkpoint",
        "",
    ]
    if isinstance(source, Mapping):
        lines[-2:-2] = [
            "## Source and licence",
            "",
            f"These weights were trained and released by the authors of {source.get('repository')} and converted "
            "to vistok's layout without retraining. Their licence is their authors', not vistok's: read it at the "
            "repository and the page you downloaded them from before you use or share them.",
            "",
            *[f"- {note}" for note in source.get("notes", [])],
            *([""] if source.get("notes") else []),
        ]
    metrics = config.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.6g} |" if isinstance(value, float) else f"| {name} | {value} |" for name, value in sorted(metrics.items())]
    elif isinstance(source, Mapping):
        lines.append("None: the weights were imported; measure them with `vistok score`.")
    else:
        lines.append("The checkpoint recorded no validation metrics.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import vistok",
        "",
        'tok = vistok.load("path/to/this/directory")  # eval mode',
        f"tokens = tok.encode(images)       # images (B, 3, {config['image_size']}, {config['image_size']}) in [0, 1]",
        "recon = tok.decode(tokens[:, :8])  # any prefix of the tokens",
        "```",
        "",
        "```bash",
        "vistok encode path/to/this/directory images/ --out tokens.npz",
        "vistok decode path/to/this/directory tokens.npz --out reconstructions/",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_checkpoint(
    ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True, force: bool = False
) -> Path:
    """Write a training checkpoint's tokenizer as OUT_DIR/{model.safetensors, config.json, README.md}.

    The EMA weights are exported unless ``use_ema`` is False. The files are written into a
    temporary directory next to ``out_dir`` and renamed into place, so ``out_dir`` is never
    half-written. A non-empty ``out_dir`` is refused unless ``force``. Returns ``out_dir``.
    """
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    check_out_dir(out_dir, ckpt_path, force)
    model, config = tokenizer_from_checkpoint(ckpt_path, use_ema=use_ema)
    return write_export(model, config, out_dir)


def write_export(model: torch.nn.Module, config: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``model`` as OUT_DIR/{model.safetensors, config.json, README.md}, atomically.

    ``config`` is config.json's structure (:func:`describe` or :func:`describe_tokenizer` plus
    extra fields); the weights' SHA-256 is added to it. The files are written into a temporary
    directory next to ``out_dir`` and renamed into place, so ``out_dir`` is never half-written.
    """
    out_dir = Path(out_dir)
    # Cloning gives every tensor its own storage: safetensors refuses shared (tied) storage, and
    # load_state_dict fills tied parameters from the duplicates with the same values.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        weights = tmp / WEIGHTS_FILE
        with atomic_path(weights) as weights_tmp:  # safetensors writes 0600; atomic_path gives the umask's mode
            save_file(
                tensors,
                str(weights_tmp),
                metadata={
                    "format": "pt",
                    "vistok_format_version": str(FORMAT_VERSION),
                    # A second copy of the architecture: a config.json edited after export is caught
                    # even when the edit leaves every tensor shape unchanged.
                    "vistok_tokenizer": json.dumps(config["tokenizer"], sort_keys=True),
                },
            )
        config["weights"]["sha256"] = _sha256_file(weights)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(config))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; an export is an ordinary directory
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed before the rename
    return out_dir


# --------------------------------------------------------------------------------------------
# Load


def _read_export_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise VistokError(
            f"{directory} is not an exported vistok tokenizer (it has no {CONFIG_FILE}); create one with "
            "`vistok export CKPT DIR` or pass a training .ckpt file."
        )
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VistokError(f"{config_path} is not valid JSON ({error}); restore it or re-export the checkpoint.") from None
    if not isinstance(config, dict):
        raise VistokError(f"{config_path} is not a JSON object; restore it or re-export the checkpoint.")
    version = config.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise VistokError(
            f"{config_path} has export format version {version!r}, which vistok {vistok_version()} cannot read "
            f"(it reads version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade vistok or re-export the "
            "checkpoint with this version."
        )
    return config


def _load_export_dir(directory: Path) -> LoadedTokenizer:
    config = _read_export_config(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise VistokError(f"{directory} has no {WEIGHTS_FILE}; copy the whole exported directory or re-export the checkpoint.")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise VistokError(
            f"{weights_path} is truncated or corrupted ({error}); copy it again or re-export the checkpoint."
        ) from None
    weights_record = config.get("weights")
    recorded = weights_record.get("sha256") if isinstance(weights_record, dict) else None
    if recorded is not None and _sha256_file(weights_path) != recorded:
        raise VistokError(
            f"{weights_path} does not match the SHA-256 recorded in {CONFIG_FILE} (the file is corrupted or was "
            "replaced); copy it again or re-export the checkpoint."
        )
    model = build_from_config(config.get("tokenizer"), str(config_path))
    check_state_dict(model, state, str(weights_path), str(config_path))
    try:
        embedded = json.loads(metadata["vistok_tokenizer"]) if "vistok_tokenizer" in metadata else None
    except json.JSONDecodeError:
        raise VistokError(f"{weights_path} has a corrupted header (its recorded tokenizer config is not JSON); re-export the checkpoint.") from None
    if embedded is not None:
        difference = _first_difference(embedded, config["tokenizer"])
        if difference is not None:
            raise VistokError(
                f"{config_path} does not match {weights_path}: its tokenizer setting '{difference}' differs from the "
                "one the weights were exported with; restore the exported config.json (or re-export the checkpoint)."
            )
    for key in ("image_size", "max_tokens", "codebook_size"):
        if key in config and config[key] != getattr(model, key):
            raise VistokError(
                f"{config_path} says {key} = {config[key]!r} but its tokenizer config builds a model with "
                f"{getattr(model, key)!r}; restore the exported config.json (or re-export the checkpoint)."
            )
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedTokenizer(model, config, dict(config.get("metrics") or {}), fingerprint(model), directory)


def _load_checkpoint_file(path: Path, use_ema: bool) -> LoadedTokenizer:
    model, config = tokenizer_from_checkpoint(path, use_ema=use_ema, fallback_to_raw=True)
    model.eval()
    return LoadedTokenizer(model, config, config["metrics"], fingerprint(model), path)


def load_with_metadata(path: str | os.PathLike, use_ema: bool = True) -> LoadedTokenizer:
    """Like :func:`load`, also returning the config, recorded metrics and fingerprint."""
    path = Path(path)
    if not path.exists():
        raise VistokError(f"{path} does not exist; pass an exported tokenizer directory (from `vistok export`) or a training .ckpt file.")
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        path = path.parent  # a file inside an exported directory names that directory
    if path.is_dir():
        return _load_export_dir(path)
    return _load_checkpoint_file(path, use_ema)


def load(path: str | os.PathLike, use_ema: bool = True):
    """Load a tokenizer for use: an exported directory, or a vistok training checkpoint (.ckpt).

    Returns the ImageTokenizer in eval mode on the CPU (move it with ``.to(device)``); it takes
    images ``(B, 3, H, W)`` in ``[0, 1]`` with H = W = ``image_size``. From a training checkpoint
    the EMA weights are used when it has them (``use_ema=False`` takes the raw weights).
    Raises VistokError, with one sentence, for anything that is not a valid tokenizer.
    """
    return load_with_metadata(path, use_ema=use_ema).tokenizer
