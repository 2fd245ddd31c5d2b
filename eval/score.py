"""`vistok score` as library functions: score a tokenizer on an image set, or two image folders.

:func:`score_tokenizer` loads the images (resized to the tokenizer's resolution by the shared
rule: shorter side to S, bicubic, centre crop; or refused with ``resize=False`` when they are
not S x S), runs :func:`vistok.eval.rate_distortion.rate_distortion` and writes into ``out_dir``:

- ``report.json``: settings, protocol, one row per (method, token count), adaptive-length summary, notes;
- ``rate_distortion.csv``: the rows;
- ``rate_distortion.png``: PSNR/SSIM/LPIPS/rFID against bytes per image, one line per method;
- ``perturbation.png`` (with ``perturb``): the metrics against the fraction of tokens perturbed;
- ``reconstructions.png``: example images (rows) by token count (columns).

:func:`score_folders` scores reconstructions made elsewhere against their originals, matching
file names (relative path without extension), and writes ``report.json`` and ``scores.csv``.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vistok.data.images import list_images, load_rgb, resize_center_crop, to_tensor
from vistok.data.sources import iter_image_source
from vistok.eval.metrics import ReconstructionEvaluator, bits_per_token
from vistok.eval.pretrained import load_networks
from vistok.eval.plots import plot_perturbation, plot_rate_distortion, save_reconstruction_grid
from vistok.eval.rate_distortion import BASELINES, ROW_FIELDS, parse_token_counts, rate_distortion
from vistok.eval.report import format_table, write_csv
from vistok.tokenizers.atomic import atomic_write_json, check_writable
from vistok.tokenizers.device import resolve_device
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.token_perturb import check_discrete

log = logging.getLogger(__name__)

PROTOCOL = {
    "rounding": "originals and reconstructions rounded to 8 bits (round(x*255)) before every metric",
    "psnr": "mean over images of per-image PSNR, data range 1, capped at 100 dB",
    "ssim": ("torchmetrics SSIM, data_range=1.0, 11x11 Gaussian window (sigma 1.5), mean over the whole SSIM map "
             "(no border dropped); scikit-image and Wang et al. 2004 average only where the window fits, dropping a "
             "5-pixel border, which moves values by a few hundredths per image at 32 px: compare SSIM within one convention"),
    "lpips": "lpips package, VGG16 backbone, v0.1 linear layers, mean over images",
    "rfid": ("Inception-v3 2015-12-05 (torch-fidelity port) pool features (2048-d) of uint8 images resized to 299 "
             "with TF1 bilinear interpolation without antialiasing; float64 statistics; reconstructions vs their originals"),
    "bits": "tokens x log2(codebook size); soft tokens: tokens x dimension x 16 (16-bit floats)",
    "codecs": ("Pillow JPEG (4:2:0) and lossy WebP, per image the highest quality (1-100) whose whole file fits in the "
               "tokens' bytes; where even quality 1 does not fit, within_budget < 1 and the row is no equal-rate comparison"),
    "thumbnail": ("per image the largest 8-bit RGB thumbnail (aspect kept) whose pixels x 24 bits fit in the tokens' bits, "
                  "downscaled bicubic with antialiasing, upscaled bicubic; mid-grey below 24 bits"),
    "resize": "images resized so the shorter side is the tokenizer's size (bicubic, antialiased) and centre-cropped",
    "perturbation": ("at the largest scored token count k, round(rate x k) tokens per image at uniformly drawn positions "
                     "replaced by another code (random: uniform over the other codes; nearest: VQ one of the k nearest "
                     "codewords, FSQ a grid neighbour one level away on one channel, LFQ one flipped bit), then decoded; "
                     "positions and codes are drawn once per batch from a seeded CPU generator, so a lower rate's "
                     "replacements are part of every higher rate's; rate 0 decodes the clean tokens"),
}

SUMMARY_COLUMNS = ("method", "num_tokens", "perturb_rate", "bits_per_image", "bytes_per_image", "quality", "at_rate", "psnr", "ssim", "lpips", "rfid", "usage", "perplexity")


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
                              or (kind is int and int(value) != value) or not math.isfinite(value)):
        raise VistokError(f"{name} must be a positive {'whole number' if kind is int else 'number'}, got {value!r}.")


def parse_rates(value: str | Sequence[float] | None) -> list[float]:
    """Perturbation rates from "0.05,0.1,0.2" (or a sequence): sorted, distinct, each in [0, 1]."""
    if value is None:
        return []
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    rates = []
    for item in items:
        try:
            rate = float(item)
        except (TypeError, ValueError):
            rate = float("nan")
        if isinstance(item, bool) or not 0.0 <= rate <= 1.0:
            raise VistokError(f"--perturb takes comma-separated fractions of the tokens in [0, 1] such as 0.05,0.1,0.2, got {item!r}.")
        rates.append(rate)
    if not rates:
        raise VistokError("--perturb is empty; give fractions of the tokens in [0, 1] such as 0.05,0.1,0.2.")
    return sorted(set(rates))


def sized_images(source: str, image_size: int, limit: int | None, resize: bool) -> Iterator[tuple[str, Tensor]]:
    """(name, (3, S, S) float [0, 1]) from ``source``; resized and centre-cropped to S unless ``resize`` is False,
    in which case an image of another size is refused with a VistokError naming it."""
    for name, image in iter_image_source(source, image_size if resize else None, limit):
        if tuple(image.shape[1:]) != (image_size, image_size):
            raise VistokError(
                f"image {name} is {image.shape[2]}x{image.shape[1]} but the tokenizer takes {image_size}x{image_size}; "
                "drop --no-resize to resize (shorter side) and centre-crop, or resize the images first."
            )
        yield name, image


def batched(items: Iterable[tuple[str, Tensor]], batch_size: int) -> Iterator[Tensor]:
    """Stack consecutive (name, (3, H, W)) items into (B, 3, H, W) batches of at most ``batch_size``."""
    batch: list[Tensor] = []
    for _, image in items:
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _progress(total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)  # disable=None: only on a terminal


def _count_hint(source: str, limit: int | None) -> int | None:
    """How many images a local folder will yield (for the progress bar), or None when unknown."""
    path = Path(source).expanduser()
    total = len(list_images(path)) if path.is_dir() else None
    if total is not None and limit is not None:
        total = min(total, limit)
    return total if total is not None else limit


def score_tokenizer(tokenizer: Any | str | os.PathLike, data: str, token_counts: str | Sequence[int] | None = None, *,
                    limit: int | None = None, batch_size: int = 16, device: str | None = None,
                    inception_weights: str | os.PathLike | bool | None = None,
                    lpips_weights: str | os.PathLike | bool | None = None, target_psnr: float | None = None,
                    out_dir: str | os.PathLike | None = None, resize: bool = True, codecs: Sequence[str] = BASELINES,
                    num_examples: int = 8, progress: bool = True, perturb: str | Sequence[float] | None = None,
                    perturb_kind: str = "random", perturb_k: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Score a tokenizer on an image set; returns the report (and writes its files when ``out_dir``).

    tokenizer: an ImageTokenizer, or a path to an exported directory or a training ``.ckpt``.
    data: a folder of images, an image file, webdataset shard URL(s) or ``"sample"``.
    token_counts: "8,16,32" or a list; default powers of two up to K, plus K.
    inception_weights / lpips_weights: None looks in the torch hub cache, a path loads that file,
    False turns the metric off; missing weights skip the metric with a note in the report.
    target_psnr: also choose per image the smallest token count reaching this PSNR (dB).
    perturb: "0.05,0.1" or a list of rates: rows with that fraction of the tokens replaced by
    ``perturb_kind`` codes (random | nearest; ``perturb_k`` the VQ neighbourhood), seeded by ``seed``.
    """
    _check_positive("--batch-size", batch_size)
    _check_positive("--limit", limit)
    _check_positive("--target-psnr", target_psnr, float)
    if num_examples:
        _check_positive("--examples", num_examples)
    device = resolve_device(device)
    source_label = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__
    if isinstance(tokenizer, (str, os.PathLike)):
        from vistok.tokenizers.export import load

        tokenizer = load(tokenizer)
    counts = parse_token_counts(token_counts, tokenizer.max_tokens, getattr(tokenizer, "decodes_prefixes", True))
    rates = parse_rates(perturb)
    if rates:  # before any image or network loads
        check_discrete(tokenizer.quantizer)

    images = sized_images(data, tokenizer.image_size, limit, resize)
    first = next(images, None)  # bad data (missing, empty, wrong size) fails before the networks load
    if first is None:
        raise VistokError(f"{data} yielded no images; point DATA at a folder of images, shard URLs or 'sample'.")
    inception, lpips, notes = load_networks(inception_weights, lpips_weights)
    if out_dir is not None:  # before the scoring, which a late failure to write would waste
        check_writable(out_dir, "--out", create=True)

    def all_images() -> Iterator[tuple[str, Tensor]]:
        yield first
        yield from images

    bar = _progress(_count_hint(data, limit), "scoring") if progress else None
    try:
        result = rate_distortion(
            tokenizer, batched(all_images(), batch_size), counts, device=device, inception=inception, lpips=lpips,
            codecs=codecs, target_psnr=target_psnr, num_examples=num_examples, notes=notes,
            on_batch=bar.update if bar is not None else None, perturb=rates, perturb_kind=perturb_kind,
            perturb_k=perturb_k, seed=seed,
        )
    finally:
        if bar is not None:
            bar.close()

    report: dict[str, Any] = {
        "tokenizer": {
            "source": source_label,
            "arch": getattr(tokenizer, "arch", None),
            "image_size": int(tokenizer.image_size),
            "max_tokens": int(tokenizer.max_tokens),
            "codebook_size": tokenizer.codebook_size,
            "token_dim": int(tokenizer.token_dim),
            "bits_per_token": bits_per_token(tokenizer.codebook_size, tokenizer.token_dim),
        },
        "data": {"source": str(data), "num_images": result.num_images, "limit": limit, "resized": resize},
        "token_counts": result.token_counts,
        "protocol": PROTOCOL,
        "rows": result.rows,
        "adaptive": result.adaptive,
        "notes": result.notes,
    }
    if rates:
        report["perturbation"] = {"rates": rates, "kind": perturb_kind, "k": perturb_k, "seed": seed,
                                  "num_tokens": result.token_counts[-1]}
    if out_dir is not None:
        report["files"] = write_tokenizer_outputs(report, result.examples, Path(out_dir))
    return report


def write_tokenizer_outputs(report: dict[str, Any], examples: dict[Any, Tensor], out_dir: Path) -> dict[str, str]:
    """report.json, rate_distortion.csv, rate_distortion.png and reconstructions.png in ``out_dir`` (atomically each)."""
    title = f"{report['tokenizer']['source']} on {report['data']['source']} ({report['data']['num_images']} images)"
    at_rate = [row for row in report["rows"] if row.get("perturb_rate") is None]
    files = {
        "csv": str(write_csv(out_dir / "rate_distortion.csv", report["rows"], ROW_FIELDS)),
        "plot": str(plot_rate_distortion(at_rate, out_dir / "rate_distortion.png", title=title, adaptive=report.get("adaptive"))),
    }
    if report.get("perturbation"):
        files["perturbation_plot"] = str(plot_perturbation(report["rows"], out_dir / "perturbation.png", title=title))
    if examples:
        files["grid"] = str(save_reconstruction_grid(examples, out_dir / "reconstructions.png", title=title))
    files["json"] = str(out_dir / "report.json")
    atomic_write_json(out_dir / "report.json", {**report, "files": files})
    return files


def _read_image(file: Path) -> tuple[Any, str | None]:
    """(upright RGB PIL image, None), or (None, why it cannot be read)."""
    try:
        return load_rgb(file), None
    except Exception as error:  # any decode failure: the file is skipped, as `vistok encode` skips it
        return None, f"{type(error).__name__}: {error}"


def _skip(skipped: list[dict[str, str]], name: str, file: Path, reason: str) -> None:
    log.warning("skipped %s: %s", file, reason)
    skipped.append({"name": name, "path": str(file), "reason": reason})


def _match_names(reference: Path, reconstructions: Path, skipped: list[dict[str, str]]) -> list[tuple[str, Path, Path]]:
    """(name, reference file, reconstruction file) matched by relative path without extension.

    A reference without a reconstruction that cannot be read is appended to ``skipped`` (``vistok
    encode`` skipped it too, so it has no reconstruction); any other unmatched name is an error.
    """
    def index(folder: Path, flag: str) -> dict[str, Path]:
        if not folder.exists():
            raise VistokError(f"{flag} {folder} does not exist; pass a folder of images.")
        if not folder.is_dir():
            raise VistokError(f"{flag} {folder} is not a folder; pass a folder of images.")
        files = list_images(folder)
        if not files:
            raise VistokError(f"{flag} {folder} holds no images; pass a folder of .png/.jpg/.webp images.")
        named: dict[str, Path] = {}
        for file in files:
            name = file.relative_to(folder).with_suffix("").as_posix()
            if name in named:
                raise VistokError(f"{flag} {folder} holds both {named[name].name} and {file.name}, so '{name}' is ambiguous; keep one file per name.")
            named[name] = file
        return named

    refs, recs = index(reference, "--reference"), index(reconstructions, "--reconstructions")
    missing = []
    for name in sorted(set(refs) - set(recs)):
        _, reason = _read_image(refs[name])
        if reason is None:
            missing.append(name)
        else:
            _skip(skipped, name, refs[name], reason)
            del refs[name]
    extra = sorted(set(recs) - set(refs))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference image(s) have no reconstruction ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if extra:
            parts.append(f"{len(extra)} reconstruction(s) have no reference ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
        raise VistokError(f"the folders' file names do not match: {' and '.join(parts)}; give each reconstruction its original's name (any image extension).")
    return [(name, refs[name], recs[name]) for name in sorted(refs)]


def _load_pair(name: str, reference: Path, reconstruction: Path, resize: bool,
               skipped: list[dict[str, str]]) -> tuple[Tensor, Tensor] | None:
    """(reference, reconstruction) as (3, H, W) [0, 1]; None (and a skip) for an unreadable reference."""
    ref, reason = _read_image(reference)
    if reason is not None:
        _skip(skipped, name, reference, reason)
        return None
    try:
        rec = load_rgb(reconstruction)
    except Exception as error:
        raise VistokError(f"cannot read the reconstruction {reconstruction} ({type(error).__name__}: {error}); replace the unreadable file.") from None
    if ref.size != rec.size:
        square = rec.size[0] == rec.size[1]
        if not resize or not square:
            raise VistokError(
                f"'{name}' is {ref.size[0]}x{ref.size[1]} in the reference but {rec.size[0]}x{rec.size[1]} in the reconstructions; "
                + ("drop --no-resize to resize and centre-crop the reference to the reconstruction's size." if square
                   else "save reconstructions at the reference's size.")
            )
        ref = resize_center_crop(ref, rec.size[0])
    return to_tensor(ref), to_tensor(rec)


def score_folders(reference: str | os.PathLike, reconstructions: str | os.PathLike, *, limit: int | None = None,
                  batch_size: int = 16, device: str | None = None,
                  inception_weights: str | os.PathLike | bool | None = None,
                  lpips_weights: str | os.PathLike | bool | None = None, out_dir: str | os.PathLike | None = None,
                  resize: bool = True, progress: bool = True) -> dict[str, Any]:
    """PSNR, SSIM, LPIPS and rFID of reconstructions against their originals, matched by file name.

    Names are relative paths without extension (``a/x.png`` matches ``a/x.jpg``). A reference of
    another size than its reconstruction is resized (shorter side) and centre-cropped to it, unless
    ``resize`` is False. An unreadable reference is skipped with a warning and listed under
    ``skipped`` in the report (``vistok encode`` skips such files, so they have no reconstruction);
    every other unmatched name is an error naming the first few.
    """
    _check_positive("--batch-size", batch_size)
    _check_positive("--limit", limit)
    device = resolve_device(device)
    skipped: list[dict[str, str]] = []
    pairs = _match_names(Path(reference).expanduser(), Path(reconstructions).expanduser(), skipped)[:limit]
    loaded = (pair for pair in (_load_pair(*names, resize, skipped) for names in pairs) if pair is not None)
    first = next(loaded, None)  # a size mismatch fails before the networks load
    if first is None:
        raise VistokError(f"--reference {reference} holds no readable image with a reconstruction ({len(skipped)} skipped); check the folders.")
    inception, lpips, notes = load_networks(inception_weights, lpips_weights)
    if out_dir is not None:  # before the scoring, which a late failure to write would waste
        check_writable(out_dir, "--out", create=True)
    evaluator = ReconstructionEvaluator([0], inception=inception, lpips=lpips, notes=notes).to(device)

    num_images = 0

    def flush(refs: list[Tensor], recs: list[Tensor]) -> None:
        nonlocal num_images
        evaluator.update(torch.stack(refs).to(device), torch.stack(recs).to(device))
        num_images += len(refs)
        if bar is not None:
            bar.update(len(refs))

    bar = _progress(len(pairs), "scoring") if progress else None
    refs, recs = [first[0]], [first[1]]
    try:
        for ref, rec in loaded:
            if len(refs) == batch_size or ref.shape != refs[0].shape:  # a batch holds one image size
                flush(refs, recs)
                refs, recs = [], []
            refs.append(ref)
            recs.append(rec)
        flush(refs, recs)
    finally:
        if bar is not None:
            bar.close()
    values = evaluator.compute()[0]
    if num_images < 2 and inception is not None:
        notes.append("rFID needs at least two images; score more images to get it.")
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable reference image(s) (listed under 'skipped' in report.json), as `vistok encode` skips them.")
    row = {"method": "reconstructions", "num_images": num_images,
           **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    report: dict[str, Any] = {
        "reference": str(reference),
        "reconstructions": str(reconstructions),
        "num_images": num_images,
        "skipped": {"count": len(skipped), "files": skipped},
        "protocol": {k: PROTOCOL[k] for k in ("rounding", "psnr", "ssim", "lpips", "rfid")}
                    | {"resize": "a reference of another size is resized (shorter side, bicubic) and centre-cropped to its reconstruction"},
        "rows": [row],
        "notes": notes,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        fields = ("method", "num_images", "psnr", "ssim", "lpips", "rfid")
        files = {"csv": str(write_csv(out_dir / "scores.csv", [row], fields)), "json": str(out_dir / "report.json")}
        report["files"] = files
        atomic_write_json(out_dir / "report.json", report)
    return report


def _at_rate(within_budget: float | None) -> str | None:
    """The table's word for a baseline row: reached the tokens' rate for all images, none, or a share."""
    if within_budget is None:
        return None
    return "yes" if within_budget >= 1 else "NO" if within_budget <= 0 else f"{within_budget:.0%}"


def summary(report: dict[str, Any]) -> str:
    """The table printed at the end of `vistok score`, followed by the adaptive summary and notes."""
    columns = SUMMARY_COLUMNS if "token_counts" in report else ("method", "num_images", "psnr", "ssim", "lpips", "rfid")
    rows = [{**row, "at_rate": _at_rate(row.get("within_budget"))} for row in report["rows"]]
    lines = [format_table(rows, columns)]
    adaptive = report.get("adaptive")
    if adaptive:
        lines.append(
            f"target PSNR {adaptive['target_psnr']:g} dB: mean {adaptive['mean_tokens']:.2f} tokens "
            f"(median {adaptive['tokens_median']:g}, 10-90% {adaptive['tokens_p10']:g}-{adaptive['tokens_p90']:g}), "
            f"{adaptive['mean_bits_per_image']:.1f} bits/image, reached by {adaptive['fraction_reached']:.1%} of images"
        )
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("files"):
        lines.append("wrote " + ", ".join(report["files"].values()))
    return "\n".join(lines)

