"""Classical baselines at a bit budget: JPEG and WebP (Pillow) within a file size, and a thumbnail codec.

JPEG uses Pillow's defaults besides quality (baseline, 4:2:0 chroma subsampling, standard
tables); WebP is lossy WebP at Pillow's default effort (method 4). File sizes are the complete
files, headers included, which dominate at the lowest budgets (a JPEG file is rarely under
~300 bytes, a WebP file under ~40), exactly as a user storing the image would pay for them. Below
those sizes a codec cannot reach a budget at all (:attr:`CodecMatch.fits`); the thumbnail codec
(the largest 8-bit RGB thumbnail that fits, scaled back up) reaches every budget of 24 bits or more.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vistok.eval.metrics import psnr_per_image, round_8bit

CODECS = {"jpeg": "JPEG", "webp": "WEBP"}
QUALITIES = range(1, 101)  # Pillow's quality scale for both codecs
THUMBNAIL_BITS_PER_PIXEL = 24  # 8-bit RGB


def _check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    return CODECS[codec]


def tensor_to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> 8-bit RGB PIL image (rounded, not truncated)."""
    array = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> (3, H, W) float32 in [0, 1] (RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def encode(image: Image.Image, codec: str, quality: int) -> bytes:
    """The bytes of ``image`` saved as ``codec`` ("jpeg" | "webp") at Pillow quality 1..100."""
    buffer = io.BytesIO()
    image.save(buffer, format=_check_codec(codec), quality=int(quality))
    return buffer.getvalue()


def decode(data: bytes) -> Tensor:
    """Encoded bytes -> (3, H, W) float32 in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        return pil_to_tensor(image)


def codec_roundtrip(images: Tensor, codec: str, quality: int) -> tuple[Tensor, Tensor]:
    """Compress each image at one quality. images (B, 3, H, W) [0, 1] -> (decoded (B, 3, H, W), bytes (B,) long)."""
    files = [encode(tensor_to_pil(image), codec, quality) for image in images]
    decoded = torch.stack([decode(data) for data in files]).to(images.device)
    return decoded, torch.tensor([len(data) for data in files], dtype=torch.long)


def codec_psnr(images: Tensor, codec: str, quality: int) -> tuple[float, float]:
    """(mean per-image PSNR in dB, mean bytes per image) of ``codec`` at ``quality`` on images (B, 3, H, W) [0, 1]."""
    decoded, sizes = codec_roundtrip(images, codec, quality)
    return float(psnr_per_image(decoded, images).mean()), float(sizes.double().mean())


def jpeg_psnr(images: Tensor, quality: int) -> tuple[float, float]:
    """(mean PSNR dB, mean bytes) of JPEG at ``quality``; see :func:`codec_psnr`."""
    return codec_psnr(images, "jpeg", quality)


def webp_psnr(images: Tensor, quality: int) -> tuple[float, float]:
    """(mean PSNR dB, mean bytes) of lossy WebP at ``quality``; see :func:`codec_psnr`."""
    return codec_psnr(images, "webp", quality)


def quality_within(size_at: Callable[[int], int], budget: float) -> int:
    """The highest quality in 1..100 whose file size is at most ``budget`` bytes; 1 when none fits.

    Bisects on the sizes, which grow with quality up to small codec wiggles: ~7 encodes per search.
    A codec must not spend more bytes than the tokens it is compared with, so the match is the
    best file within the budget, never the closest one above it. ``size_at(quality)`` should be
    cached by the caller when several budgets share an image.
    """
    lo, hi = QUALITIES[0], QUALITIES[-1]
    while lo < hi:  # invariant: every quality above hi is over budget
        mid = (lo + hi + 1) // 2
        if size_at(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class CodecMatch:
    """A codec at the highest quality within one byte budget, per image.

    reconstruction: (B, 3, H, W) decoded images in [0, 1]. nbytes, quality: (B,) long. fits: (B,)
    bool, False where even quality 1 is larger than the budget (the codec cannot reach that rate).
    """

    target_bytes: float
    reconstruction: Tensor
    nbytes: Tensor
    quality: Tensor
    fits: Tensor


def codec_at_bytes(images: Tensor, codec: str, target_bytes: Sequence[float]) -> list[CodecMatch]:
    """Per image, the highest quality whose file fits each byte budget, and its decoded result.

    images: (B, 3, H, W) in [0, 1]. Returns one :class:`CodecMatch` per budget, in order. Encodes
    are cached per image across budgets, so many budgets cost little more than one.
    """
    _check_codec(codec)

    def search(image: Tensor) -> list[tuple[int, bytes]]:
        pil = tensor_to_pil(image)
        files: dict[int, bytes] = {}

        def size_at(quality: int) -> int:
            if quality not in files:
                files[quality] = encode(pil, codec, quality)
            return len(files[quality])

        chosen = [quality_within(size_at, budget) for budget in target_bytes]
        return [(q, files[q] if q in files else encode(pil, codec, q)) for q in chosen]

    per_target = list(zip(*[search(image) for image in images.cpu()]))  # [budget][image]
    matches = []
    for target, chosen in zip(target_bytes, per_target):
        decoded = torch.stack([decode(data) for _, data in chosen]).to(images.device)
        nbytes = torch.tensor([len(data) for _, data in chosen], dtype=torch.long)
        matches.append(CodecMatch(
            target_bytes=float(target),
            reconstruction=decoded,
            nbytes=nbytes,
            quality=torch.tensor([q for q, _ in chosen], dtype=torch.long),
            fits=nbytes <= target,
        ))
    return matches


def thumbnail_size(height: int, width: int, bits: float) -> tuple[int, int] | None:
    """The largest (h, w) with the image's aspect ratio whose h * w * 24 bits fit in ``bits``.

    Returns None when not even one 8-bit RGB pixel (24 bits) fits.
    """
    pixels = int(bits // THUMBNAIL_BITS_PER_PIXEL)
    if pixels < 1:
        return None
    aspect = width / height
    best = (1, 1)
    for h in range(1, height + 1):  # a few hundred candidates at most: no need to be clever
        w = min(width, max(1, round(h * aspect)))
        if h * w > pixels:
            break
        best = (h, w)
    return best


def thumbnail_bits(height: int, width: int, bits: float) -> int:
    """The bits the thumbnail codec stores for an image of ``height`` x ``width`` at a budget of ``bits``
    (at most ``bits``; 0 when not even one pixel fits)."""
    size = thumbnail_size(height, width, bits)
    return 0 if size is None else size[0] * size[1] * THUMBNAIL_BITS_PER_PIXEL


def thumbnail_reconstruct(images: Tensor, bits: float) -> Tensor:
    """The thumbnail codec: shrink to :func:`thumbnail_size`, store 8 bits per channel, upscale bicubically.

    images: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1]. Downscaling is antialiased
    (bicubic); below 24 bits nothing can be stored and the result is mid-grey.
    """
    height, width = images.shape[-2:]
    size = thumbnail_size(height, width, bits)
    if size is None:
        return torch.full_like(images, 0.5)
    small = round_8bit(F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False))
    return F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def thumbnail_psnr(images: Tensor, bits: float) -> float:
    """Mean per-image PSNR (dB) of the thumbnail codec at a budget of ``bits`` per image.

    images: (B, 3, H, W) in [0, 1]. The baseline a tokenizer of the same bits must beat.
    """
    with torch.no_grad():
        return float(psnr_per_image(thumbnail_reconstruct(images, bits), images).mean())
