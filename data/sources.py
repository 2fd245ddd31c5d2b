"""Image sources: every image of a folder, an image file, webdataset shards or the embedded sample.

:func:`iter_image_source` is how ``vistok encode`` and ``vistok score`` read their input. Imports in
:mod:`vistok.data` go one way, images <- shards <- sample <- sources and datamodule, so the image
helpers never need the shard or sample modules and reading a source never needs Lightning.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from vistok.data.images import IMAGE_EXTENSIONS, list_images, load_rgb, resize_center_crop, to_tensor
from vistok.data.sample import sample_shard_urls
from vistok.data.shards import expand_shard_urls, read_labeled_shard_samples
from vistok.tokenizers.errors import VistokError

log = logging.getLogger(__name__)


def _looks_like_shards(source: str) -> bool:
    lowered = source.lower()
    return (
        "://" in source
        or lowered.startswith("pipe:")
        or "::" in source
        or ("{" in source and ".." in source)
        or lowered.endswith((".tar", ".tar.gz", ".tgz"))
    )


def iter_image_source(
    source: str, image_size: int | None, limit: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, image)`` pairs, image a ``(3, H, W)`` float tensor in ``[0, 1]``.

    ``source`` is a folder of images (recursive, sorted; name = relative path without
    extension), one image file (name = file stem), webdataset shard URL(s) (brace patterns,
    ``a.tar::b.tar``, globs, a folder holding only ``.tar`` files; name = sample key) or
    ``"sample"`` (the validation split of the embedded scikit-image default, built at
    ``image_size`` or 256). With ``image_size`` every image is resized (shorter side) and
    centre-cropped to ``image_size`` x ``image_size``; with None images keep their size.
    Unreadable images inside a folder or shard are skipped with one warning each; a missing
    path or a folder without images raises :class:`VistokError`.
    """
    for name, image, _ in iter_labeled_images(source, image_size, limit):
        yield name, image


def iter_labeled_images(
    source: str, image_size: int | None, limit: int | None = None
) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """Like :func:`iter_image_source`, with each image's class label: the ``cls`` member of a
    webdataset sample (as ImageNet shards carry), None for image files and unlabelled samples."""
    if limit is not None and limit < 1:
        return
    produced = 0
    for name, img, label in _iter_pil(source, image_size):
        if image_size is not None:
            img = resize_center_crop(img, image_size)
        yield name, to_tensor(img), label
        produced += 1
        if limit is not None and produced >= limit:
            return


def _iter_pil(source: str, image_size: int | None) -> Iterator[tuple[str, Image.Image, int | None]]:
    source = str(source)
    if source == "sample":
        _, val_urls = sample_shard_urls(image_size or 256)
        yield from _iter_shards(val_urls, source)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        images = list_images(path)
        if images:
            for file in images:
                name = file.relative_to(path).with_suffix("").as_posix()
                try:
                    img = load_rgb(file)
                except Exception as error:  # one bad file must not end a scoring run
                    log.warning("skipped %s: %s", file, error)
                    continue
                yield name, img, None
            return
        tars = sorted(str(p) for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        if tars:
            yield from _iter_shards(tars, source)
            return
        raise VistokError(
            f"the folder {source} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards; "
            "point to a folder of images, an image file, shard URLs or 'sample'"
        )
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            img = load_rgb(path)
        except Exception as error:
            raise VistokError(f"cannot read the image {source} ({error}); pass a readable image file") from error
        yield path.stem, img, None
        return
    if _looks_like_shards(source) or any(ch in source for ch in "*?["):
        yield from _iter_shards(expand_shard_urls(source, setting="the image source"), source)
        return
    if path.is_file():
        raise VistokError(
            f"{source} is not an image ({', '.join(IMAGE_EXTENSIONS)}) or a .tar shard; "
            "pass a folder of images, an image file, shard URLs or 'sample'"
        )
    raise VistokError(
        f"the image source {source} does not exist; pass a folder of images, an image file, "
        "shard URLs (e.g. 'shards/shard-{000000..000009}.tar') or 'sample'"
    )


def _iter_shards(urls: list[str], source: str) -> Iterator[tuple[str, Image.Image, int | None]]:
    for key, data, label in read_labeled_shard_samples(urls):
        try:
            img = load_rgb(data)
        except Exception as error:
            log.warning("skipped %s in %s: %s", key, source, error)
            continue
        yield key, img, label
