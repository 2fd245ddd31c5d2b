"""Image helpers shared by every part of vistok: listing, loading to RGB, resizing, tensors.

Everything that turns a file (or the bytes of a shard member) into pixels goes through
:func:`load_rgb`, so training, scoring and encoding see the same pixels for the same file:
alpha is composited onto white, palette/grayscale/CMYK/YCbCr images become RGB, 16-bit images
are scaled (not truncated) to 8 bits, and the EXIF orientation is applied.

This is the bottom of :mod:`vistok.data`: it imports nothing else from it. Reading a whole source
(a folder, shards, the embedded sample) is :mod:`vistok.data.sources`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_EXIF_ORIENTATION = 0x0112


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by their path relative to it.

    Sorting by the relative POSIX path (not by ``Path`` objects) gives the same order on
    every platform, which is what makes shard writing deterministic. Hidden files and
    folders (names starting with ".") are ignored.
    """
    root = Path(folder)
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append((relative.as_posix(), path))
    return [path for _, path in sorted(found)]


def open_image(source: ImageSource) -> Image.Image:
    """Open an image lazily (only the header is read); bytes, paths and file objects work.

    The caller decides how to decode (e.g. JPEG draft mode before :meth:`Image.load`).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    return Image.open(source)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, also when there is no EXIF data)."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not make an otherwise fine image unreadable
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, palette or RGB/L with a transparency key) is composited onto white;
    16-bit grayscale is scaled by 255/65535; mode "I" is treated as 16-bit when a value
    exceeds 255 and as 8-bit otherwise (Pillow uses "I" for both); mode "F" is taken as
    [0, 1] when its maximum is at most 1, else as [0, 255].
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(source: ImageSource) -> Image.Image:
    """Decode an image file, bytes or file object fully into an upright 8-bit RGB PIL image.

    Raises an exception (``OSError``, ``PIL.UnidentifiedImageError``, ``ValueError``, ...) for
    unreadable or truncated data; callers that must not stop on bad files catch and count it.
    """
    img = open_image(source)
    img.load()  # decode now so truncation raises here, not later in a worker
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def center_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square of a ``width`` x ``height`` image as a PIL box."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and crop the centre square.

    Done as one PIL resize of the centred square box, which is the same operation without an
    intermediate image. Images smaller than ``size`` are resized up, never rejected.
    """
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, box=center_square(*img.size))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8 tensor (one copy, contiguous)."""
    array = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float32 tensor in ``[0, 1]``."""
    return to_uint8_tensor(img).float().div_(255.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` (or ``(1, H, W)``) float tensor in ``[0, 1]`` -> PIL image rounded to 8 bits."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"to_pil expects a (3, H, W) or (1, H, W) tensor, got shape {tuple(tensor.shape)}")
    pixels = tensor.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    array = pixels.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], "L")
    return Image.fromarray(array, "RGB")
