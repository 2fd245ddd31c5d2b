"""The embedded default dataset: scikit-image's bundled photographs as webdataset shards.

A new user has no dataset, but scikit-image ships real photographs inside its wheel. On
first use they are cut into random square crops at the training resolution and written as
train and validation shards (whole photographs are held out for validation, never crops of
training photos), cached under ``$VISTOK_DATA_DIR/sample/`` (default ``~/.cache/vistok/sample/``)
and reused afterwards. :class:`vistok.data.datamodule.SampleDataModule` reads them like any other shards.

Only images that load from the installed package without a download are used (skimage's
``cells3d``, ``brain``, ``eagle``, ``kidney``, ``lily``, ``skin``, ... need pooch and a network);
synthetic images (checkerboard, logo, colorwheel, phantom, horse silhouette) are left out.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vistok.data.shards import EncodedSample, encode_image, write_samples
from vistok.tokenizers.errors import VistokError

log = logging.getLogger(__name__)

# name -> (skimage.data function, index into its returned tuple or None). All bundled in the wheel.
SAMPLE_PHOTOS: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),  # 512x512 colour portrait
    "rocket": ("rocket", None),  # 640x427 colour
    "hubble_deep_field": ("hubble_deep_field", None),  # 1000x872 colour
    "retina": ("retina", None),  # 1411x1411 colour fundus photograph
    "immunohistochemistry": ("immunohistochemistry", None),  # 512x512 colour microscopy
    "motorcycle_left": ("stereo_motorcycle", 0),  # 741x500 colour, stereo pair: both stay in train
    "motorcycle_right": ("stereo_motorcycle", 1),
    "moon": ("moon", None),  # 512x512 grey
    "brick": ("brick", None),  # 512x512 grey texture
    "grass": ("grass", None),  # 512x512 grey texture
    "gravel": ("gravel", None),  # 512x512 grey texture
    "page": ("page", None),  # 384x191 grey, printed text
    "text": ("text", None),  # 448x172 grey, text on a sign
    "clock": ("clock", None),  # 400x300 grey, motion blur
    "cell": ("cell", None),  # 550x660 grey microscopy
    # held out for validation (whole photographs)
    "chelsea": ("chelsea", None),  # 451x300 colour, a cat
    "coffee": ("coffee", None),  # 600x400 colour
    "camera": ("camera", None),  # 512x512 grey, the cameraman
    "coins": ("coins", None),  # 384x303 grey
}
VAL_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "camera", "coins")
TRAIN_PHOTOS: tuple[str, ...] = tuple(name for name in SAMPLE_PHOTOS if name not in VAL_PHOTOS)

TRAIN_SHARDS = 16  # enough shards for 16 ranks x workers without idle readers
VAL_SHARDS = 8
RECIPE_VERSION = 1  # bump when the crops change, so old caches are not reused


def default_data_dir() -> Path:
    """``$VISTOK_DATA_DIR`` if set, else ``~/.cache/vistok``."""
    return Path(os.environ.get("VISTOK_DATA_DIR") or Path.home() / ".cache" / "vistok").expanduser()


def sample_dir(
    resolution: int,
    *,
    data_dir: str | os.PathLike | None = None,
    crops_per_photo: int = 128,
    val_crops_per_photo: int = 32,
    seed: int = 0,
) -> Path:
    """Where the shards for these settings live (the name encodes every setting)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    name = f"{resolution}px-{crops_per_photo}x{val_crops_per_photo}-seed{seed}-v{RECIPE_VERSION}"
    return root / "sample" / name


def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as an ``(H, W, 3)`` uint8 array (no download)."""
    import skimage.data

    function, index = SAMPLE_PHOTOS[name]
    image = getattr(skimage.data, function)()
    if index is not None:
        image = image[index]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"skimage.data.{function} is {image.dtype}, expected uint8")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _crops(
    photos: dict[str, Image.Image], count: int, resolution: int, seed: int, split: str
) -> Iterator[EncodedSample]:
    """``count`` random square crops per photo, resized to ``resolution``, in a shuffled order.

    Crop sides are log-uniform between ``min(resolution, shorter side)`` and the shorter side,
    so crops are never upsampled unless the photograph itself is smaller than the resolution.
    """
    plan = []
    for name, photo in photos.items():
        rng = random.Random(f"{seed}/{split}/{name}")
        width, height = photo.size
        shorter = min(width, height)
        low = min(resolution, shorter)
        for i in range(count):
            side = round(math.exp(rng.uniform(math.log(low), math.log(shorter))))
            left = rng.randint(0, width - side)
            top = rng.randint(0, height - side)
            plan.append((name, i, (left, top, left + side, top + side)))
    random.Random(f"{seed}/{split}/order").shuffle(plan)  # mix photos inside every shard
    for name, i, box in plan:
        crop = photos[name].resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
        ext, data = encode_image(crop, "jpeg", 95)
        key = f"{name}/{i:04d}"
        yield EncodedSample(key, ext, data, photos[name].size, crop.size)


def _load_photos(names: Sequence[str]) -> dict[str, Image.Image]:
    photos = {}
    for name in names:
        try:
            photos[name] = Image.fromarray(load_photo(name), "RGB")
        except Exception as error:  # a future scikit-image may drop or move an image
            log.warning("embedded dataset: skipping skimage.data %s (%s)", name, error)
    return photos


def build_sample_shards(
    resolution: int,
    *,
    data_dir: str | os.PathLike | None = None,
    crops_per_photo: int = 128,
    val_crops_per_photo: int = 32,
    seed: int = 0,
) -> Path:
    """Write the embedded default's shards once and return their folder (``train/``, ``val/``).

    Built in a temporary folder next to the final one and renamed into place, so an
    interrupted build leaves nothing that looks finished and concurrent builders (e.g. DDP
    ranks) cannot clash: the first rename wins and the others discard their copy.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise VistokError(f"data.image_size must be a positive integer, got {resolution!r}")
    for setting, value in (("data.crops_per_photo", crops_per_photo), ("data.val_crops_per_photo", val_crops_per_photo)):
        if not isinstance(value, int) or value < 1:
            raise VistokError(f"{setting} must be at least 1, got {value!r}")
    final = sample_dir(
        resolution, data_dir=data_dir, crops_per_photo=crops_per_photo,
        val_crops_per_photo=val_crops_per_photo, seed=seed,
    )
    if (final / "sample.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as error:
        raise VistokError(
            f"cannot create the embedded dataset folder under {final.parent} ({error}); "
            "set VISTOK_DATA_DIR or data.data_dir to a writable folder"
        ) from error
    log.info("building the embedded sample dataset at %s", final)
    try:
        splits = {"train": (TRAIN_PHOTOS, crops_per_photo, TRAIN_SHARDS), "val": (VAL_PHOTOS, val_crops_per_photo, VAL_SHARDS)}
        manifest: dict = {"resolution": resolution, "seed": seed, "recipe_version": RECIPE_VERSION}
        for split, (names, count, shards) in splits.items():
            photos = _load_photos(names)
            if not photos:
                raise VistokError(f"no scikit-image photograph for the {split} split loads; reinstall scikit-image")
            total = len(photos) * count
            write_samples(
                _crops(photos, count, resolution, seed, split), temporary / split,
                samples_per_shard=math.ceil(total / shards),
                extra={"source": "skimage.data", "photos": sorted(photos)},
            )
            manifest[split] = {"photos": list(photos), "crops_per_photo": count, "samples": total}
        with open(temporary / "sample.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        os.chmod(temporary, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(temporary, final)
        except OSError:
            if not (final / "sample.json").is_file():
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def sample_shard_urls(
    resolution: int,
    *,
    data_dir: str | os.PathLike | None = None,
    crops_per_photo: int = 128,
    val_crops_per_photo: int = 32,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """``(train shard paths, val shard paths)`` of the embedded default, building it if needed."""
    folder = build_sample_shards(
        resolution, data_dir=data_dir, crops_per_photo=crops_per_photo,
        val_crops_per_photo=val_crops_per_photo, seed=seed,
    )
    return (
        sorted(str(p) for p in (folder / "train").glob("shard-*.tar")),
        sorted(str(p) for p in (folder / "val").glob("shard-*.tar")),
    )
