"""`vistok export | encode | decode | info`: thin commands over vistok.tokenizers.export.

export  CKPT OUT_DIR [--no-ema] [--force]
        a training checkpoint -> OUT_DIR/{model.safetensors, config.json, README.md}
encode  TOKENIZER IMAGES... --out tokens.npz [--num-tokens k] [--target-psnr DB] [--batch-size] [--device]
        image files, folders or webdataset shard URLs -> token indices (or soft codes) per image;
        with --target-psnr each image keeps the shortest prefix reaching DB (padded, with a lengths array)
decode  TOKENIZER tokens.npz --out DIR [--num-tokens k] [--batch-size] [--device]
        tokens (any prefix; each image at its own length when the file has lengths) -> one PNG per image
info    TOKENIZER [--json]
        the config and the validation metrics recorded at training time

TOKENIZER is an exported directory or a training .ckpt. Every file is written under a temporary
name in its destination directory and renamed, so an interrupted command leaves nothing
half-written. Bad input raises VistokError, which the `vistok` command prints as one sentence (exit 2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from vistok.tokenizers.atomic import atomic_write, check_writable
from vistok.tokenizers.device import resolve_device
from vistok.tokenizers.errors import VistokError

NPZ_FORMAT = "vistok-tokens"
# 2 added the optional per-image ``lengths`` (with ``--target-psnr``); version 1 files read as before.
NPZ_FORMAT_VERSION = 2
# Where an image's tokens end before the row does (``lengths``), the row is padded with this index
# (never a code) or, for soft codes, with zeros.
PAD_INDEX = -1
NPZ_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive
PROGRESS_MIN_IMAGES = 8  # below this a progress bar is noise


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``command``'s arguments (one of export, encode, decode, info) to its subparser."""
    if command == "export":
        parser.add_argument("checkpoint", metavar="CKPT", help="training checkpoint (.ckpt) written by train.py")
        parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write model.safetensors, config.json and README.md into")
        parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="export the raw weights instead of the EMA weights")
        parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT_DIR")
        return
    parser.add_argument("tokenizer", metavar="TOKENIZER", help="exported tokenizer directory or training .ckpt")
    if command == "info":
        parser.add_argument("--json", action="store_true", help="print the whole config (config.json's structure) as JSON")
        return
    if command == "encode":
        parser.add_argument(
            "images", metavar="IMAGES", nargs="+",
            help="image files, folders (searched recursively) or webdataset shard URLs (brace patterns work); "
            "each image is resized (shorter side, bicubic) to the tokenizer's image size and center-cropped",
        )
        parser.add_argument("--out", required=True, metavar="TOKENS.npz", help="output .npz file")
        parser.add_argument("--num-tokens", type=int, default=None, metavar="K", help="keep the first K tokens per image (default: all)")
        parser.add_argument("--target-psnr", type=float, default=None, metavar="DB",
                            help="keep per image the fewest tokens (up to K) whose reconstruction reaches DB dB PSNR, the search of "
                            "`vistok score --target-psnr`; the file gets padded tokens and a lengths array")
    elif command == "decode":
        parser.add_argument("tokens", metavar="TOKENS.npz", help="an .npz written by `vistok encode`")
        parser.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs (created if needed)")
        parser.add_argument("--num-tokens", type=int, default=None, metavar="K", help="decode only the first K tokens of each image (a prefix)")
    else:
        raise ValueError(f"vistok.tokenizers.cli has no command {command!r}")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    """Run ``args.command``; returns the exit status (bad input raises VistokError)."""
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "export": _export, "encode": _encode, "decode": _decode, "info": _info,
    }
    return commands[args.command](args)


# --------------------------------------------------------------------------------------------
# Helpers


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise VistokError(f"--batch-size must be at least 1, got {batch_size}.")


def _check_num_tokens(k: int | None, max_tokens: int) -> None:
    if k is not None and not 1 <= k <= max_tokens:
        raise VistokError(f"--num-tokens {k} is outside 1..{max_tokens}, the tokens per image of this tokenizer; choose a value in that range.")


def _check_target_psnr(target: float | None, tokenizer: Any) -> float | None:
    if target is None:
        return None
    if not math.isfinite(target) or target <= 0:
        raise VistokError(f"--target-psnr must be a positive number of dB such as 30, got {target!r}.")
    if not tokenizer.decodes_prefixes:
        raise VistokError(f"--target-psnr keeps a prefix of each image's tokens, but this {tokenizer.arch} tokenizer decodes only "
                          f"its full grid of {tokenizer.max_tokens}; drop --target-psnr.")
    return float(target)


def pad_after(tokens: Any, lengths: Any) -> Any:
    """tokens (B, k) long or (B, k, D) float with positions >= lengths[b] (B,) set to the padding
    (:data:`PAD_INDEX` for indices, 0 for soft codes), so a file holds no token beyond an image's length."""
    import torch

    beyond = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lengths.to(tokens.device)[:, None]
    if tokens.is_floating_point():
        return tokens.masked_fill(beyond[..., None], 0.0)
    return tokens.masked_fill(beyond, PAD_INDEX)


def _count_images(sources: list[str]) -> int | None:
    """How many images the sources hold when that is cheap to know (local files and folders), else None."""
    from vistok.data.images import IMAGE_EXTENSIONS, list_images

    total = 0
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = len(list_images(path))
            if found == 0:  # a folder of shards
                return None
            total += found
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            total += 1
        else:  # shards: counting would mean reading them twice
            return None
    return total


def _iter_images(sources: list[str], image_size: int) -> Iterator[tuple[str, Any]]:
    """(name, (3, H, W) float [0, 1]) for every image of every source, refusing duplicate names."""
    from vistok.data.sources import iter_image_source

    seen: dict[str, str] = {}
    for source in sources:
        for name, image in iter_image_source(source, image_size):
            name = str(name)
            if name in seen:
                where = f"both in {source}" if seen[name] == source else f"in {seen[name]} and in {source}"
                raise VistokError(
                    f"two images are named {name!r} ({where}), so their tokens and decoded PNGs could not be told "
                    "apart; rename one of them or encode them into separate .npz files."
                )
            seen[name] = source
            yield name, image


def png_paths(names: list[str]) -> list[PurePosixPath]:
    """Relative PNG paths for encoded image names: sub/a.jpg -> sub/a.png, shard key k -> k.png.

    Names come from a file, so anything that could leave the output directory (absolute paths,
    "..") is neutralised. When two names would give the same PNG (a.jpg and a.png), both keep
    their full name (a.jpg.png, a.png.png).
    """
    from vistok.data.images import IMAGE_EXTENSIONS

    def parts(name: str) -> list[str]:
        pieces = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        pieces = ["_" if p == ".." else p for p in pieces]
        return pieces or ["image"]

    def short(name: str) -> PurePosixPath:
        path = PurePosixPath(*parts(name))
        stem = path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name
        return path.with_name(stem + ".png")

    def full(name: str) -> PurePosixPath:
        path = PurePosixPath(*parts(name))
        return path.with_name(path.name + ".png")

    shorts = [short(name) for name in names]
    counts = Counter(shorts)
    paths = [path if counts[path] == 1 else full(name) for path, name in zip(shorts, names)]
    clash = next((path for path, n in Counter(paths).items() if n > 1), None)
    if clash is not None:
        raise VistokError(f"several encoded images map to the same PNG {clash}; encode images with distinct names.")
    return paths


def _read_tokens(path: Path) -> dict[str, Any]:
    """The arrays of an .npz written by ``vistok encode``, loaded without pickle."""
    import zipfile

    import numpy as np

    if not path.is_file():
        raise VistokError(f"{path} does not exist; pass an .npz written by `vistok encode`.")
    with open(path, "rb") as handle:
        if handle.read(len(NPZ_MAGIC)) != NPZ_MAGIC:  # else numpy reads a text file as a refused pickle
            raise VistokError(f"{path} is not an .npz file (an .npz is a zip archive, this file is not); pass an .npz written by `vistok encode`.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise VistokError(f"{path} is not a readable .npz of tokens ({error}); pass an intact file written by `vistok encode`.") from None
    missing = [key for key in ("tokens", "names") if key not in arrays]
    if missing or str(arrays.get("format", "")) != NPZ_FORMAT:
        raise VistokError(f"{path} is not a vistok tokens file (no {', '.join(missing) or 'format'} entry); pass an .npz written by `vistok encode`.")
    return arrays


def _read_lengths(data: dict[str, Any], path: Path, tokens: Any) -> Any:
    """The file's per-image lengths (N,) int64, checked against its tokens, or None (all rows full)."""
    import numpy as np

    version = int(data.get("format_version", 1))
    if version > NPZ_FORMAT_VERSION:
        raise VistokError(f"{path} is a version {version} tokens file, newer than this vistok reads ({NPZ_FORMAT_VERSION}); upgrade vistok.")
    if "lengths" not in data:
        return None
    lengths = data["lengths"]
    if lengths.shape != tokens.shape[:1] or not np.issubdtype(lengths.dtype, np.integer) or (
            lengths.size and (lengths.min() < 1 or lengths.max() > tokens.shape[1])):
        raise VistokError(f"{path} has a lengths array that does not fit its {tokens.shape[0]} rows of {tokens.shape[1]} tokens "
                          "(one length from 1 to the row width per image); it is corrupted, encode the images again.")
    return lengths.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Commands


def _export(args: argparse.Namespace) -> int:
    from vistok.tokenizers.export import CONFIG_FILE, export_checkpoint

    out_dir = export_checkpoint(args.checkpoint, args.out_dir, use_ema=args.use_ema, force=args.force)
    config = json.loads((out_dir / CONFIG_FILE).read_text())
    print(
        f"exported the {'EMA' if config['weights']['kind'] == 'ema' else 'raw'} weights of {args.checkpoint} ({config['arch']} / {config['quantizer']}, "
        f"{config['weights']['num_parameters']:,} parameters, up to {config['max_tokens']} tokens at "
        f"{config['image_size']}x{config['image_size']}) to {out_dir}"
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from vistok.eval.metrics import bits_per_token
    from vistok.eval.rate_distortion import choose_lengths, summarize_lengths
    from vistok.tokenizers.export import load_with_metadata, vistok_version

    _check_batch_size(args.batch_size)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.is_dir():
        raise VistokError(f"--out {out} is a directory; give the path of the .npz file to write, e.g. {out / 'tokens.npz'}.")
    check_writable(out, "--out", folder=False)
    loaded = load_with_metadata(args.tokenizer)
    tokenizer = loaded.tokenizer
    _check_num_tokens(args.num_tokens, tokenizer.max_tokens)
    k = tokenizer.max_tokens if args.num_tokens is None else args.num_tokens
    target = _check_target_psnr(args.target_psnr, tokenizer)
    tokenizer.to(device)

    total = _count_images(args.images)
    names: list[str] = []
    chunks: list[np.ndarray] = []
    chosen: list[torch.Tensor] = []  # with --target-psnr: (lengths (B,), psnr (B,)) per batch
    batch: list[torch.Tensor] = []
    progress: list[tqdm] = []  # opened with the first batch, so a bad source fails before any bar is drawn

    def flush() -> None:
        images = torch.stack(batch).to(device)
        with torch.inference_mode():
            tokens = tokenizer.encode(images, num_tokens=k)
            if target is not None:
                lengths, psnr = choose_lengths(tokenizer, images, target, tokens=tokens, candidates=range(1, k + 1))
                tokens = pad_after(tokens, lengths)
                chosen.append(torch.stack([lengths.double(), psnr]).cpu())
        chunks.append(tokens.cpu().numpy())
        if not progress:
            progress.append(tqdm(total=total, unit="img", desc="encoding",
                                 disable=total is not None and total < PROGRESS_MIN_IMAGES))
        progress[0].update(len(batch))
        batch.clear()

    try:
        for name, image in _iter_images(args.images, tokenizer.image_size):
            names.append(name)
            batch.append(image)
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
    finally:
        for bar in progress:
            bar.close()
    if not names:
        raise VistokError(f"no images found in {' '.join(args.images)}; pass image files, folders of images or shard URLs.")

    tokens = np.concatenate(chunks)
    if tokenizer.is_discrete:
        # int32 halves the file for every codebook that fits (all practical ones).
        tokens = tokens.astype(np.int32 if tokenizer.codebook_size <= np.iinfo(np.int32).max else np.int64)
    else:
        tokens = tokens.astype(np.float32)
    arrays = {
        "tokens": tokens,
        "names": np.array(names, dtype=str),
        "format": np.array(NPZ_FORMAT),
        "format_version": np.array(NPZ_FORMAT_VERSION),
        "kind": np.array("indices" if tokenizer.is_discrete else "codes"),
        "num_tokens": np.array(k),
        "max_tokens": np.array(tokenizer.max_tokens),
        "codebook_size": np.array(-1 if tokenizer.codebook_size is None else tokenizer.codebook_size),
        "token_dim": np.array(tokenizer.token_dim),
        "image_size": np.array(tokenizer.image_size),
        "fingerprint": np.array(loaded.fingerprint),
        "vistok_version": np.array(vistok_version()),
    }
    summary = None
    if target is not None:
        lengths, psnr = torch.cat(chosen, dim=1)
        arrays.update(lengths=lengths.numpy().astype(np.int32), psnr=psnr.numpy().astype(np.float32),
                      target_psnr=np.array(target))
        summary = summarize_lengths(lengths.long(), psnr, target, tokenizer.codebook_size, tokenizer.token_dim)
    atomic_write(out, lambda handle: np.savez(handle, **arrays))
    what = "token indices" if tokenizer.is_discrete else f"soft codes of dimension {tokenizer.token_dim}"
    if summary is None:
        print(f"encoded {len(names)} image(s) into {k} {what} each ({k} of {tokenizer.max_tokens}): {out}")
        return 0
    missed = round(len(names) * (1 - summary["fraction_reached"]))
    fixed_bytes = k * bits_per_token(tokenizer.codebook_size, tokenizer.token_dim) / 8
    print(f"encoded {len(names)} image(s) into {what}, each at its own length for {target:g} dB PSNR: mean "
          f"{summary['mean_tokens']:.2f} of {k} tokens ({summary['mean_bits_per_image'] / 8:.1f} bytes per image against "
          f"{fixed_bytes:.1f} at a fixed {k}, {1 - summary['mean_bits_per_image'] / 8 / fixed_bytes:.1%} saved): {out}")
    if missed:
        print(f"{missed} image(s) did not reach {target:g} dB with all {k} tokens and keep all {k}.")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vistok.data.images import to_pil
    from vistok.tokenizers.export import load_with_metadata

    _check_batch_size(args.batch_size)
    device = resolve_device(args.device)
    path = Path(args.tokens)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise VistokError(f"--out {out_dir} is a file; give a directory for the PNGs.")
    check_writable(out_dir, "--out")
    data = _read_tokens(path)
    loaded = load_with_metadata(args.tokenizer)
    tokenizer = loaded.tokenizer
    tokens, names = data["tokens"], [str(n) for n in data["names"].reshape(-1)]
    lengths = _read_lengths(data, path, tokens)
    if lengths is not None:  # only the tokens before each image's length are tokens; the rest is padding
        beyond = np.arange(tokens.shape[1])[None, :] >= lengths[:, None]
        tokens = np.where(beyond[:, :, None] if tokens.ndim == 3 else beyond, 0, tokens).astype(tokens.dtype)

    if tokenizer.is_discrete:
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise VistokError(f"{path} holds {'soft codes' if tokens.ndim == 3 else f'an array of shape {tokens.shape}'}, but this tokenizer takes (N, k) integer indices; decode it with the tokenizer that encoded it.")
        file_codebook = int(data.get("codebook_size", tokenizer.codebook_size))
        if file_codebook != tokenizer.codebook_size:
            raise VistokError(f"{path} was encoded with a codebook of {file_codebook} codes, this tokenizer has {tokenizer.codebook_size}; decode it with the tokenizer that encoded it.")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.codebook_size):
            raise VistokError(f"{path} holds indices outside [0, {tokenizer.codebook_size}); it is corrupted or from another tokenizer.")
    elif tokens.ndim != 3 or tokens.shape[2] != tokenizer.token_dim or not np.issubdtype(tokens.dtype, np.floating):
        raise VistokError(f"{path} holds an array of shape {tokens.shape} ({tokens.dtype}), but this tokenizer takes (N, k, {tokenizer.token_dim}) float codes; decode it with the tokenizer that encoded it.")
    if len(names) != tokens.shape[0]:
        raise VistokError(f"{path} has {len(names)} names for {tokens.shape[0]} token rows; it is corrupted, encode the images again.")

    available = tokens.shape[1]
    k = available if args.num_tokens is None else args.num_tokens
    _check_num_tokens(k, tokenizer.max_tokens)
    if k > available:
        raise VistokError(f"--num-tokens {k} asks for more tokens than {path} holds ({available} per image); encode with --num-tokens {k} or more, or decode at most {available}.")
    if "fingerprint" in data and str(data["fingerprint"]) != loaded.fingerprint:
        print(
            f"vistok decode: warning: {path} was encoded by a tokenizer with fingerprint {data['fingerprint']}, this one is "
            f"{loaded.fingerprint}; the images are only faithful when the weights are the same.",
            file=sys.stderr,
        )
    if k < available:
        print(f"decoding a prefix: the first {k} of the {available} tokens per image in {path}")
    if lengths is not None:
        lengths = np.minimum(lengths, k)
        if not tokenizer.decodes_prefixes and int(lengths.min()) < tokenizer.max_tokens:
            raise VistokError(f"{path} keeps fewer than {tokenizer.max_tokens} tokens for some images, but this {tokenizer.arch} "
                              "tokenizer decodes only its full grid; decode it with the tokenizer that encoded it.")

    tokenizer.to(device)
    targets = png_paths(names)
    for start in range(0, len(names), args.batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(tokens[start:start + args.batch_size, :k]))
        chunk = chunk.long() if tokenizer.is_discrete else chunk.float()
        own = None if lengths is None else torch.from_numpy(lengths[start:start + args.batch_size]).long().to(device)
        with torch.inference_mode():
            images = tokenizer.decode(chunk.to(device), lengths=own).cpu()
        for image, target in zip(images, targets[start:start + args.batch_size]):
            pil = to_pil(image)
            atomic_write(out_dir / target, lambda handle: pil.save(handle, format="PNG"))
    if lengths is None:
        print(f"decoded {len(names)} image(s) from {k} of {tokenizer.max_tokens} tokens into {out_dir}")
    else:
        print(f"decoded {len(names)} image(s), each at its own length (mean {lengths.mean():.2f}, "
              f"{lengths.min()} to {lengths.max()} of {tokenizer.max_tokens} tokens), into {out_dir}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from vistok.tokenizers.export import load_with_metadata

    loaded = load_with_metadata(args.tokenizer)
    config = loaded.config
    if args.json:
        print(json.dumps({**config, "fingerprint": loaded.fingerprint}, indent=2))
        return 0
    codebook = f"{config['codebook_size']:,} codes" if config["codebook_size"] is not None else "none (soft tokens)"
    training = config.get("training") or {}
    if loaded.source.is_dir():
        kind = f"exported directory, format version {config['format_version']}, exported by vistok {config['vistok_version']}"
    else:
        kind = "training checkpoint"
    rows = [
        ("source", f"{loaded.source} ({kind})"),
        ("architecture", f"{config['arch']} / {config['quantizer']}"),
        ("codebook", codebook),
        ("tokens", f"up to {config['max_tokens']} per image ({'any prefix decodes' if loaded.tokenizer.decodes_prefixes else 'only the full grid decodes'}), dimension {config['token_dim']}"),
        ("image size", f"{config['image_size']}x{config['image_size']}"),
        ("input", config["input"]["images"]),
        ("weights", f"{config['weights']['kind']}, {config['weights']['num_parameters']:,} parameters, fingerprint {loaded.fingerprint}"),
    ]
    source = config.get("source")
    if isinstance(source, dict):  # `vistok import`: the weights are another project's
        rows.append(("imported", f"{source.get('format')} file {source.get('file')} of {source.get('repository')} (licence: its authors')"))
    else:
        rows.append(("trained", f"step {training.get('step')} from {training.get('checkpoint')} with vistok {training.get('vistok_version')}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("tokenizer config:")
    for line in json.dumps(config["tokenizer"], indent=2).splitlines():
        print(f"  {line}")
    print("metrics (last validation in the checkpoint):")
    if loaded.metrics:
        name_width = max(len(name) for name in loaded.metrics)
        for name, value in sorted(loaded.metrics.items()):
            print(f"  {name:<{name_width}}  {value:.6g}" if isinstance(value, float) else f"  {name:<{name_width}}  {value}")
    else:
        print("  none recorded")
    return 0
