"""Writing webdataset shards from a folder of images, and finding/reading existing shards.

Layout written by :func:`write_shards` (``vistok shards SRC OUT``)::

    OUT/shard-000000.tar, shard-000001.tar, ...   tar files written by webdataset's ShardWriter
    OUT/index.json                                 samples per shard, total, image sizes, skipped files

Each sample has the key ``<relative path without extension>`` (dots and other characters
outside letters, digits, ``_``, ``-`` and ``/`` replaced by ``_``, as webdataset splits a member
name at its first dot; a clash gets the extension and then a number appended) and one member,
the image (``.jpg`` or ``.png``). Storage rule: a JPEG source that needs no resizing and is
upright is stored byte for byte (re-encoding a JPEG only adds loss); every other image is
converted to RGB (see :func:`vistok.data.images.load_rgb`) and encoded as JPEG quality 95 with 4:4:4
chroma (or PNG with ``image_format="png"``). Same input, same settings, same Pillow build ->
byte-identical shards: files are processed in sorted order, tar headers have a fixed mtime and
owner, and encoder settings are fixed. Every shard and the index are written to a temporary
name and renamed, so a killed run never leaves a half-written ``shard-*.tar``.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError

from vistok.data.images import IMAGE_EXTENSIONS, exif_orientation, list_images, open_image, resize_center_crop, to_rgb
from vistok.tokenizers.atomic import atomic_write_json, check_writable
from vistok.tokenizers.errors import VistokError

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
INDEX_VERSION = 1
# Member extensions the readers accept as "the image" of a sample, in order of preference.
IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "img")
_FIXED_MTIME = 0  # tar header time; fixed so the same input gives byte-identical shards
_KEY_UNSAFE = re.compile(r"[^\w\-/]")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")


# ----------------------------------------------------------------------------- URLs


def _is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url)) and not url.startswith("file://")


def expand_shard_urls(urls: str | Sequence[str], setting: str = "data.train_urls") -> list[str]:
    """Expand shard URLs into a list, checking that local shards exist.

    ``urls`` is a string (brace patterns ``shard-{000000..000127}.tar``, several patterns
    joined by ``::``, shell globs ``shards/*.tar``, ``~``) or a list of such strings. Remote
    URLs (``https://``, ``s3://``, ``pipe:`` ...) are passed through unchecked. Raises
    :class:`VistokError` naming ``setting`` when nothing matches or a local shard is missing.
    """
    if isinstance(urls, (str, os.PathLike)):
        patterns = [str(urls)]
    else:
        patterns = [str(u) for u in urls]
    expanded: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            if _is_remote(url):
                expanded.append(url)
                continue
            local = os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url)
            if any(ch in local for ch in "*?["):
                expanded.extend(sorted(glob.glob(local)))
            else:
                expanded.append(local)
    shown = patterns[0] if len(patterns) == 1 else f"{patterns[0]} (+{len(patterns) - 1} more)"
    if not expanded:
        raise VistokError(f"{setting}={shown!r} matches no shard; give existing .tar files or a brace pattern")
    missing = [u for u in expanded if not _is_remote(u) and not os.path.isfile(u)]
    if len(missing) == len(expanded):
        raise VistokError(
            f"{setting}={shown!r} matches no shard file (e.g. {missing[0]} does not exist); "
            "check the path and the brace pattern"
        )
    if missing:
        raise VistokError(
            f"{setting}={shown!r}: {len(missing)} of {len(expanded)} shards do not exist "
            f"(first: {missing[0]}); fix the brace range or write the missing shards"
        )
    return expanded


def find_image_field(sample: dict) -> bytes:
    """The encoded image bytes of a webdataset sample (first of :data:`IMAGE_FIELDS` present)."""
    for name in IMAGE_FIELDS:
        data = sample.get(name)
        if data is not None:
            return data
    fields = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"sample {sample.get('__key__')!r} has no image member (members: {fields})")


def read_shard_samples(urls: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """``(key, image bytes)`` for every sample of ``urls`` in order (no shuffling, one process).

    Broken tar data and samples without an image are skipped with a warning.
    """
    for key, data, _ in read_labeled_shard_samples(urls):
        yield key, data


def parse_label(value: bytes | str | int | None) -> int | None:
    """A webdataset ``cls`` member (ASCII digits, as ImageNet shards store it) as an int; None when absent."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"class label {text.strip()[:40]!r} is not a whole number") from None


def read_labeled_shard_samples(urls: Sequence[str]) -> Iterator[tuple[str, bytes, int | None]]:
    """``(key, image bytes, class label or None)`` for every sample of ``urls`` in order; the label
    is the ``cls`` member when the sample has one. Broken samples are skipped with a warning."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
    )
    for sample in pipeline:
        try:
            yield sample["__key__"], find_image_field(sample), parse_label(sample.get("cls"))
        except ValueError as error:
            log.warning("skipped: %s", error)


def read_index(folder: str | os.PathLike) -> dict:
    """The ``index.json`` written next to a set of shards."""
    with open(Path(folder) / INDEX_NAME, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- writing


@dataclass
class EncodedSample:
    """One image ready to be written: its key, member extension and bytes, sizes, and class label."""

    key: str
    ext: str  # "jpg" or "png"
    data: bytes
    source_size: tuple[int, int]
    stored_size: tuple[int, int]
    label: int | None = None  # written as the sample's ``cls`` member (ASCII digits, as ImageNet shards)


@dataclass
class _SizeStats:
    counts: Counter = field(default_factory=Counter)

    def add(self, size: tuple[int, int]) -> None:
        self.counts[size] += 1

    def summary(self) -> dict:
        if not self.counts:
            return {"distinct": 0}
        widths = [w for w, _ in self.counts]
        heights = [h for _, h in self.counts]
        common = sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:20]
        return {
            "distinct": len(self.counts),
            "min_width": min(widths),
            "max_width": max(widths),
            "min_height": min(heights),
            "max_height": max(heights),
            "most_common": {f"{w}x{h}": n for (w, h), n in common},
        }


def encode_image(img: Image.Image, image_format: str = "jpeg", quality: int = 95) -> tuple[str, bytes]:
    """RGB-convert and encode with fixed settings -> ``(member extension, bytes)``."""
    buffer = io.BytesIO()
    rgb = to_rgb(img)
    if image_format == "png":
        rgb.save(buffer, "PNG", compress_level=6)
        return "png", buffer.getvalue()
    rgb.save(buffer, "JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return "jpg", buffer.getvalue()


def _shard_paths(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("shard-*.tar") if re.fullmatch(r"shard-\d{6}\.tar", p.name))


class _AtomicShardSink:
    """webdataset's ShardWriter writing ``OUT/shard-NNNNNN.tar`` through temporary names.

    ShardWriter opens each shard through ``opener`` and calls ``post`` when it is complete;
    we open a hidden ``.shard-NNNNNN.tar.<pid>.tmp`` and rename it in ``post``.
    """

    def __init__(self, out_dir: Path, samples_per_shard: int):
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.counts: list[int] = []
        self.names: list[str] = []
        self.source_sizes = _SizeStats()
        self.stored_sizes = _SizeStats()
        self._open: dict[str, tuple[io.BufferedWriter, Path]] = {}
        self._writer: wds.ShardWriter | None = None

    def _opener(self, fname: str):
        final = Path(fname)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        handle = open(temporary, "wb")
        self._open[fname] = (handle, temporary)
        return handle

    def _post(self, fname: str) -> None:
        handle, temporary = self._open.pop(fname)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        if self._writer is not None and self._writer.count == 0:
            temporary.unlink()  # ShardWriter opens a shard eagerly; never publish an empty one
            return
        os.replace(temporary, fname)
        self.counts.append(self._writer.count if self._writer is not None else 0)
        self.names.append(Path(fname).name)

    def write_all(self, samples: Iterable[EncodedSample]) -> None:
        try:
            self._writer = wds.ShardWriter(
                str(self.out_dir / SHARD_PATTERN),
                maxcount=self.samples_per_shard,
                maxsize=float("inf"),  # shards are cut by count only, so the index is predictable
                post=self._post,
                opener=self._opener,
                verbose=0,
                encoder=False,
                mtime=_FIXED_MTIME,
                format="PAX_FORMAT",  # long or non-ASCII keys are fine in PAX headers
            )
            for sample in samples:
                # No members beyond the image (and its label): each costs the reader a tar header parse.
                member = {"__key__": sample.key, sample.ext: sample.data}
                if sample.label is not None:
                    member["cls"] = str(sample.label).encode("ascii")
                self._writer.write(member)
                self.source_sizes.add(sample.source_size)
                self.stored_sizes.add(sample.stored_size)
            self._writer.close()
        finally:
            for handle, temporary in self._open.values():  # interrupted: drop the partial shard
                handle.close()
                temporary.unlink(missing_ok=True)
            self._open.clear()


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> list[Path]:
    if out_dir.exists() and not out_dir.is_dir():
        raise VistokError(f"the output {out_dir} is a file; give a folder for the shards")
    check_writable(out_dir, "OUT", create=True)
    existing = _shard_paths(out_dir)
    if (existing or (out_dir / INDEX_NAME).exists()) and not overwrite:
        raise VistokError(
            f"{out_dir} already holds shards or an {INDEX_NAME}; choose an empty folder or pass --overwrite"
        )
    return existing


def write_samples(
    samples: Iterable[EncodedSample],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    *,
    overwrite: bool = False,
    skipped: Sequence[dict] | Callable[[], Sequence[dict]] = (),
    extra: dict | None = None,
) -> dict:
    """Write encoded samples as ``out_dir/shard-NNNNNN.tar`` plus ``index.json``; return the index.

    ``skipped`` lists ``{"path", "reason"}`` of inputs that could not be read (a callable is
    evaluated after the samples are consumed, for producers that skip while streaming).
    ``extra`` is merged into the index (e.g. the settings used).
    """
    if samples_per_shard < 1:
        raise VistokError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    out = Path(out_dir).expanduser()
    previous = _prepare_out_dir(out, overwrite)
    sink = _AtomicShardSink(out, samples_per_shard)
    sink.write_all(samples)
    skipped_list = list(skipped() if callable(skipped) else skipped)
    total = sum(sink.counts)
    if total == 0:
        raise VistokError(
            f"no readable image to write ({len(skipped_list)} files skipped); check the source folder"
        )
    n = len(sink.names)
    index = {
        "version": INDEX_VERSION,
        "pattern": f"shard-{{000000..{n - 1:06d}}}.tar",
        "num_shards": n,
        "total": total,
        "shards": [{"name": name, "samples": count} for name, count in zip(sink.names, sink.counts)],
        "image_sizes": {"source": sink.source_sizes.summary(), "stored": sink.stored_sizes.summary()},
        "skipped": {"count": len(skipped_list), "files": skipped_list},
        **(extra or {}),
    }
    atomic_write_json(out / INDEX_NAME, index, fsync=True)
    written = set(sink.names)
    for stale in previous:  # --overwrite with fewer shards than before: drop the leftovers
        if stale.name not in written:
            stale.unlink(missing_ok=True)
    return index


# ----------------------------------------------------------------------------- folder -> shards


@dataclass(frozen=True)
class _Settings:
    max_size: int | None
    resize: int | None
    image_format: str
    quality: int


def _key_for(relative: str) -> str:
    stem = relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative
    return _KEY_UNSAFE.sub("_", stem)


def _encode_file(job: tuple[str, str, _Settings]) -> tuple[str, EncodedSample | None, str]:
    """Read, check, convert and encode one file (runs in a worker process).

    Returns ``(relative path, sample or None, reason when skipped)``; the key is filled in
    by the parent, which sees all names in order.
    """
    path, relative, settings = job
    try:
        with open(path, "rb") as f:
            raw = f.read()
        img = open_image(raw)
        source_format = img.format
        img.load()  # full decode: truncated files fail here, not at training time
        source_size = img.size
        upright = exif_orientation(img) == 1
        if not upright:
            img = ImageOps.exif_transpose(img)
        target = _target_size(img.size, settings)
        if source_format == "JPEG" and upright and target is None:
            return relative, EncodedSample("", "jpg", raw, source_size, source_size), ""
        img = to_rgb(img)
        if settings.resize is not None:
            img = resize_center_crop(img, settings.resize)
        elif target is not None:
            img = img.resize(target, Image.Resampling.BICUBIC)
        ext, data = encode_image(img, settings.image_format, settings.quality)
        return relative, EncodedSample("", ext, data, source_size, img.size), ""
    except Exception as error:  # every failure is reported as a skip; the run goes on
        return relative, None, _reason(error)


def _reason(error: Exception) -> str:
    """A short, reproducible description (no object addresses, which would vary run to run)."""
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image (unknown or corrupt format)"
    text = str(error).splitlines()[0] if str(error) else ""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", text)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _target_size(size: tuple[int, int], settings: _Settings) -> tuple[int, int] | None:
    """New size when the image must change size, else None."""
    width, height = size
    if settings.resize is not None:
        return None if size == (settings.resize, settings.resize) else (settings.resize, settings.resize)
    if settings.max_size is not None and max(width, height) > settings.max_size:
        scale = settings.max_size / max(width, height)
        return (max(1, round(width * scale)), max(1, round(height * scale)))
    return None


def _encoded_stream(
    jobs: list[tuple[str, str, _Settings]], workers: int, skipped: list[dict],
    on_file: Callable[[], None] | None = None, labels: Mapping[str, int] | None = None,
) -> Iterator[EncodedSample]:
    """Encode in a process pool in bounded windows (memory stays flat), yielding in input order.

    ``on_file()`` is called once per input file, read or skipped (progress reports). ``labels``:
    each relative path's class index, written as its ``cls`` member."""
    used: set[str] = set()

    def finish(result: tuple[str, EncodedSample | None, str]) -> EncodedSample | None:
        relative, sample, reason = result
        if on_file is not None:
            on_file()
        if sample is None:
            log.warning("skipped %s: %s", relative, reason)
            skipped.append({"path": relative, "reason": reason})
            return None
        key = _key_for(relative)
        if key in used:  # "a.png" next to "a.jpg", or two names equal after sanitising
            base = f"{key}_{_KEY_UNSAFE.sub('_', relative.rsplit('.', 1)[-1].lower())}"
            key, n = base, 2
            while key in used:
                key, n = f"{base}_{n}", n + 1
        used.add(key)
        sample.key = key
        sample.label = None if labels is None else labels[relative]
        return sample

    if workers <= 1:
        for job in jobs:
            sample = finish(_encode_file(job))
            if sample is not None:
                yield sample
        return
    window = workers * 32
    # fork: workers inherit the imported modules (spawn would re-import torch in each, seconds);
    # they only run Pillow, so forking a process that has used torch is safe here.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        for start in range(0, len(jobs), window):
            for result in pool.imap(_encode_file, jobs[start : start + window], chunksize=4):
                sample = finish(result)
                if sample is not None:
                    yield sample


def split_files(files: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of relative file paths: ``(train, val)``, each in input order.

    The ``round(val_fraction * n)`` files (at least one, at most n - 1) with the smallest SHA-256 of
    their relative path are held out. The choice depends only on the names, not on the order files
    are listed in or on the machine, so the same folder always gives the same split.
    """
    n = len(files)
    count = min(n - 1, max(1, round(val_fraction * n)))
    ranked = sorted(files, key=lambda name: hashlib.sha256(name.encode("utf-8")).hexdigest())
    held_out = set(ranked[:count])
    return [f for f in files if f not in held_out], [f for f in files if f in held_out]


def folder_labels(files: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Class labels from each relative path's top-level folder, as torchvision's ``ImageFolder``:
    ``(class names sorted, {path: index into them})``. Every file must sit inside a class folder."""
    loose = [name for name in files if "/" not in name]
    if loose:
        more = f" (and {len(loose) - 1} more images)" if len(loose) > 1 else ""
        raise VistokError(f"--labels folder takes each image's class from its top-level folder, but {loose[0]}{more} "
                          "sits directly in the source folder; move it into a class folder or drop --labels")
    classes = sorted({name.split("/", 1)[0] for name in files})
    index = {name: i for i, name in enumerate(classes)}
    return classes, {name: index[name.split("/", 1)[0]] for name in files}


def write_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    *,
    max_size: int | None = None,
    resize: int | None = None,
    image_format: str = "jpeg",
    quality: int = 95,
    workers: int | None = None,
    overwrite: bool = False,
    val_fraction: float | None = None,
    labels: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Turn a folder tree of images into webdataset shards plus ``index.json``; return the index.

    ``max_size``: downscale images whose longer side exceeds it (aspect kept). ``resize``:
    resize the shorter side and centre-crop to ``resize`` x ``resize``. ``workers``: encoding
    processes (default: CPU count, at most 8; 0 or 1 encodes in this process). Unreadable or
    truncated files are skipped with one warning each and listed in the index.

    ``val_fraction``: hold out that share of the files (:func:`split_files`) and write
    ``out_dir/train`` and ``out_dir/val``, each with its own shards and ``index.json``; the
    returned dict is then ``{"train": index, "val": index}``. ``labels="folder"``: each sample gets
    a ``cls`` member, the index of its top-level folder among the sorted folder names
    (:func:`folder_labels`), and each index lists those names as ``classes``; both splits share
    them. ``progress(done, total)`` is called after every input file, read or skipped.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise VistokError(f"the source folder {source} does not exist; pass a folder of images")
    if not src.is_dir():
        raise VistokError(f"the source {source} is not a folder; pass a folder of images (searched recursively)")
    if max_size is not None and resize is not None:
        raise VistokError("--max-size and --resize exclude each other; pass only one")
    for name, value in (("--max-size", max_size), ("--resize", resize)):
        if value is not None and value < 1:
            raise VistokError(f"{name} must be a positive number of pixels, got {value}")
    if image_format not in ("jpeg", "png"):
        raise VistokError(f"--format must be 'jpeg' or 'png', got {image_format!r}")
    if not 1 <= quality <= 100:
        raise VistokError(f"--quality must be between 1 and 100, got {quality}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise VistokError(f"--val-fraction must be between 0 and 1 (e.g. 0.02), got {val_fraction}")
    if labels not in (None, "folder"):
        raise VistokError(f"--labels must be 'folder' (the class is each image's top-level folder), got {labels!r}")
    files = list_images(src)
    if not files:
        raise VistokError(
            f"the source folder {source} holds no images ({', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    if val_fraction is not None and len(files) < 2:
        raise VistokError(f"--val-fraction needs at least 2 images to split, {source} holds {len(files)}; drop --val-fraction")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    settings = _Settings(max_size, resize, image_format, quality)
    relative = {path.relative_to(src).as_posix(): str(path) for path in files}
    classes, label_of = folder_labels(list(relative)) if labels == "folder" else (None, None)
    out = Path(out_dir).expanduser()
    if val_fraction is None:
        splits = {None: list(relative)}
    else:
        train, val = split_files(list(relative), val_fraction)
        splits = {"train": train, "val": val}
        for name in splits:  # refuse an occupied split folder before writing the other one
            _prepare_out_dir(out / name, overwrite)
    done = [0]

    def on_file() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(files))

    indices = {}
    for name, names in splits.items():
        skipped: list[dict] = []
        split_info = {} if name is None else {"split": {
            "name": name, "val_fraction": val_fraction,
            "rule": "files ranked by SHA-256 of their relative path; the first round(val_fraction * n) are val",
        }}
        indices[name] = write_samples(
            _encoded_stream([(relative[r], r, settings) for r in names], workers, skipped, on_file, label_of),
            out if name is None else out / name,
            samples_per_shard,
            overwrite=overwrite,
            skipped=lambda skipped=skipped: skipped,
            extra={
                "source": str(src.resolve()),
                **split_info,
                **({} if classes is None else {"classes": classes}),
                "settings": {
                    "samples_per_shard": samples_per_shard,
                    "max_size": max_size,
                    "resize": resize,
                    "format": image_format,
                    "quality": quality,
                    "labels": labels,
                },
            },
        )
    return indices[None] if val_fraction is None else indices
