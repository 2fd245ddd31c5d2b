"""Figures of a score report: quality against bytes per image (and against the fraction of tokens perturbed),
and a grid of reconstructions."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from vistok.tokenizers.atomic import atomic_path  # noqa: E402

QUALITY_METRICS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS (lower is better)"), ("rfid", "rFID (lower is better)"))


def plot_rate_distortion(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "",
                         adaptive: Mapping[str, Any] | None = None) -> Path:
    """One panel per measured metric (PSNR, SSIM, LPIPS, rFID) against bytes per image, log x axis,
    one line per method (tokenizer, jpeg, webp, thumbnail); the tokenizer's points are labelled with k.

    Baseline points that could not reach the tokens' rate (``within_budget`` < 1) are drawn hollow.
    ``adaptive`` (the ``--target-psnr`` summary) adds its mean bytes and mean PSNR as a star.
    """
    methods = list(dict.fromkeys(row["method"] for row in rows))
    metrics = [(key, label) for key, label in QUALITY_METRICS if any(row.get(key) is not None for row in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for method in methods:
            points = sorted((row["bytes_per_image"], row[key], row["num_tokens"], row.get("within_budget") in (None, 1.0))
                            for row in rows if row["method"] == method and row.get(key) is not None and row.get("bytes_per_image"))
            if not points:
                continue
            xs, ys, ks, reached = zip(*points)
            (line,) = ax.plot(xs, ys, marker="o", label=method)
            missed = [(x, y) for x, y, ok in zip(xs, ys, reached) if not ok]
            if missed:
                ax.plot(*zip(*missed), linestyle="none", marker="o", markerfacecolor="white", color=line.get_color(),
                        label=f"{method}: over the tokens' bytes")
            if method == "tokenizer":
                for x, y, k in zip(xs, ys, ks):
                    ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if key == "psnr" and adaptive and adaptive.get("mean_bits_per_image"):
            ax.plot([adaptive["mean_bits_per_image"] / 8], [adaptive["mean_psnr"]], linestyle="none", marker="*",
                    markersize=12, color="black", label=f"target {adaptive['target_psnr']:g} dB: {adaptive['mean_tokens']:.1f} tokens")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per image")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save_panels(fig, path, title)


def _save_panels(fig: Any, path: str | os.PathLike, title: str) -> Path:
    """Title, lay out, write ``path`` atomically as PNG and free the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def plot_perturbation(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """One panel per measured metric against the fraction of tokens perturbed (the ``perturbed-*``
    rows), with the clean tokenizer at the same token count drawn at rate 0 as a dashed line."""
    perturbed = sorted((row for row in rows if row.get("perturb_rate") is not None), key=lambda row: row["perturb_rate"])
    k = perturbed[0]["num_tokens"] if perturbed else None
    clean = next((row for row in rows if row["method"] == "tokenizer" and row["num_tokens"] == k), None)
    metrics = [(key, label) for key, label in QUALITY_METRICS if any(row.get(key) is not None for row in perturbed)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.6 * max(1, len(metrics)), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        points = [(row["perturb_rate"], row[key]) for row in perturbed if row.get(key) is not None]
        ax.plot(*zip(*points), marker="o", label=perturbed[0]["method"])
        if clean is not None and clean.get(key) is not None:
            ax.axhline(clean[key], linestyle="--", color="gray", label=f"clean, k={k}")
        ax.set_xlabel("fraction of tokens perturbed")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save_panels(fig, path, title)


def save_reconstruction_grid(examples: Mapping[Any, Tensor], path: str | os.PathLike, title: str = "") -> Path:
    """Rows: example images; columns: the original then each token count's reconstruction.

    examples: {"original": (N, 3, H, W), k: (N, 3, H, W), ...} in [0, 1].
    """
    columns = ["original"] + sorted(k for k in examples if k != "original")
    stack = torch.stack([examples[c].float().clamp(0, 1).cpu() for c in columns], dim=1)  # (N, C, 3, H, W)
    n, c, _, h, w = stack.shape
    pad = max(1, h // 16)
    # white padding right/below each cell, then cells laid out as rows x columns
    cells = F.pad(stack, (0, pad, 0, pad), value=1.0)
    canvas = cells.permute(2, 0, 3, 1, 4).reshape(3, n * (h + pad), c * (w + pad))
    canvas = F.pad(canvas, (pad, 0, pad, 0), value=1.0)
    cell_inches = max(0.8, w / 100)  # small images are shown enlarged, large ones at ~100 dpi
    fig, ax = plt.subplots(figsize=(c * cell_inches + 0.4, n * cell_inches + 0.9))
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(c)])
    ax.set_xticklabels(["original"] + [f"k={k}" for k in columns[1:]], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_yticks([])
    if title:
        ax.set_xlabel(title, fontsize=7, wrap=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=max(100, int(w / cell_inches)))
    plt.close(fig)
    return Path(path)


def labelled_rows(rows: Sequence[tuple[str, Tensor]], min_cell: int = 128, pad: int = 4) -> Tensor:
    """Rows of images, each with its label at the left, as one picture a person can read.

    rows: (label, (N, 3, H, W) in [0, 1]) pairs, e.g. ("original", images), ("8 tokens", recon), ...;
    every row holds N images of one size. Each image is enlarged by an integer factor (nearest
    neighbour, so pixels stay visible) to at least ``min_cell`` pixels a side. Returns (3, H', W')
    in [0, 1], white background, black labels (Pillow's bundled font; no font files needed).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("labelled_rows needs at least one row")
    n, _, h, w = rows[0][1].shape
    scale = max(1, -(-min_cell // max(h, w)))  # ceil: small crops are enlarged, large ones kept
    font = ImageFont.load_default(size=max(12, min(24, h * scale // 6)))
    label_width = max(int(font.getlength(label)) for label, _ in rows) + 3 * pad
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_width + n * cell_w + pad, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        if images.shape != (n, 3, h, w):
            raise ValueError(f"row {label!r} has shape {tuple(images.shape)}, expected {(n, 3, h, w)}")
        top = pad + r * cell_h
        draw.text((pad, top + h * scale // 2), label, fill="black", font=font, anchor="lm")
        big = F.interpolate(images.float().clamp(0, 1).cpu(), scale_factor=scale, mode="nearest")
        pixels = (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            canvas.paste(Image.fromarray(pixels[i]), (label_width + i * cell_w, top))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
