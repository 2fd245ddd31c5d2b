"""The ``data`` section: throughput of the training stream, vistok's shard reader vs torchvision's ImageFolder.

    python -m vistok.eval.bench.data [--images 400] [--workers 2] [--batch-size 32] [--batches 40] [--repeats 3]

Makes ``--images`` ImageNet-like JPEGs (shorter side 300-500 px, quality 90, 4:2:0) from
scikit-image's bundled photographs, stores them once as an ImageFolder tree and once as
shards (``vistok shards``, which keeps JPEG bytes unchanged, so both read identical files),
then times ``--batches`` batches of random-resized crops + horizontal flip + float [0, 1]
tensors through each, with the same worker count, in the same run, alternating the order
across repeats. ImageFolder samples with replacement, so neither side restarts its workers
mid-run. Reported: images/s over the whole run (worker start-up included), after the first
batch (steady state), and CPU milliseconds per image summed over the main process and the
workers (the fair figure on a machine shared with other jobs). Prints a table and writes JSON
(``--out``). ``python -m vistok.eval.bench --sections data`` runs the same comparison at the
benchmark's resolution, for vistok's crop scale only.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, features

from vistok.data.sample import SAMPLE_PHOTOS, load_photo
from vistok.data.shards import write_shards
from vistok.tokenizers.atomic import atomic_write_json
from vistok.tokenizers.errors import VistokError

READERS = ("ImageFolder", "shards")


@dataclass
class DataBenchSettings:
    images: int = 400
    workers: int = 2
    batch_size: int = 32
    batches: int = 40
    size: int = 256
    repeats: int = 3
    shuffle_buffer: int = 200
    # RandomResizedCrop area ranges: vistok's 0.8-1.0 and torchvision's 0.08-1.0
    scales: list[tuple[float, float]] = field(default_factory=lambda: [(0.8, 1.0), (0.08, 1.0)])
    sides: tuple[int, int] = (300, 500)  # shorter side of the generated JPEGs, px
    dir: str | None = None  # where the images and shards go (default: a temporary folder)

    def check(self) -> None:
        for name in ("images", "batch_size", "batches", "size", "repeats", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise VistokError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.workers < 0:
            raise VistokError(f"--workers must be at least 0, got {self.workers}.")
        scales = ",".join(f"{low:g}-{high:g}" for low, high in self.scales)
        if not self.scales or any(not 0 < low <= high <= 1 for low, high in self.scales):
            raise VistokError(f"--scales {scales or '(none)'} must be LOW-HIGH areas with 0 < LOW <= HIGH <= 1.")
        if not 0 < self.sides[0] <= self.sides[1]:
            raise VistokError(f"--sides {self.sides[0]}-{self.sides[1]} must be MIN-MAX pixels with 0 < MIN <= MAX.")


def make_images(folder: Path, count: int, sides: tuple[int, int] = (300, 500), seed: int = 0) -> None:
    """``count`` JPEGs cut from the bundled photographs, one ImageFolder class per photograph.

    Each is a random crop (60-100% of the width, aspect 3:4 to 4:3) resized so its shorter
    side is uniform in ``sides`` (ImageNet's typical 300-500 px by default).
    """
    rng = np.random.default_rng(seed)
    photos = {name: Image.fromarray(load_photo(name)) for name in SAMPLE_PHOTOS}
    names = sorted(photos)
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        width, height = photo.size
        aspect = rng.uniform(3 / 4, 4 / 3)
        crop_w = int(min(width, height * aspect) * rng.uniform(0.6, 1.0))
        crop_h = int(min(height, crop_w / aspect))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        shorter = int(rng.integers(sides[0], sides[1] + 1))
        scale = shorter / min(crop_w, crop_h)
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        image = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        (folder / name).mkdir(parents=True, exist_ok=True)
        image.save(folder / name / f"{i:05d}.jpg", "JPEG", quality=90)


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_loader(make_loader: Callable[[], Any], batches: int, batch_size: int) -> dict[str, float]:
    """Wall-clock images/s, and CPU milliseconds per image (workers included).

    CPU time per image is what to compare on a machine shared with other jobs: wall time
    there depends on what else runs, CPU time much less.
    """
    gc.collect()
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    iterator = iter(make_loader())
    first = None
    seen = 0
    for i, batch in enumerate(iterator):
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        assert image.shape[0] == batch_size and image.dtype == torch.float32
        seen += image.shape[0]
        if first is None:
            first = time.perf_counter()
        if i + 1 >= batches:
            break
    end = time.perf_counter()
    del iterator, batch, image
    gc.collect()  # shut the workers down so their CPU time is counted
    cpu = _cpu_seconds() - cpu_start
    steady = (seen - batch_size) / (end - first) if end > first else float("nan")
    return {
        "images": seen,
        "seconds": end - start,
        "images_per_s": seen / (end - start),
        "steady_images_per_s": steady,
        "cpu_ms_per_image": 1000 * cpu / seen,
    }


def imagefolder_loader(folder: Path, settings: DataBenchSettings, scale: tuple[float, float]):
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(
            settings.size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=settings.batches * settings.batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, sampler=sampler, num_workers=settings.workers, drop_last=True
    )


def shard_loader(urls: list[str], settings: DataBenchSettings, scale: tuple[float, float], seed: int):
    # imported here: the reader's module imports Lightning, which the other sections never need
    from vistok.data.datamodule import make_train_loader

    return make_train_loader(
        urls, image_size=settings.size, batch_size=settings.batch_size, batches_per_epoch=settings.batches,
        num_workers=settings.workers, shuffle_buffer_size=settings.shuffle_buffer, crop="random_resized",
        scale=scale, ratio=(3 / 4, 4 / 3), hflip=True, seed=seed,
    )


def compare_loaders(settings: DataBenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both readers on the same generated JPEGs: {"settings", "machine", "rows"}, a row per reader and scale."""
    settings.check()
    with tempfile.TemporaryDirectory(dir=settings.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_images(root / "folder", settings.images, settings.sides)
        index = write_shards(root / "folder", root / "shards", samples_per_shard=100, workers=0)
        urls = [str(root / "shards" / s["name"]) for s in index["shards"]]
        folder_bytes = sum(p.stat().st_size for p in (root / "folder").rglob("*.jpg"))
        log(f"made {settings.images} JPEGs ({folder_bytes / 1e6:.1f} MB) and {len(urls)} shards "
            f"in {time.perf_counter() - t0:.1f} s")

        rows = []
        for scale in settings.scales:
            runs: dict[str, list[dict[str, float]]] = {reader: [] for reader in READERS}
            for repeat in range(settings.repeats):
                for reader in (READERS if repeat % 2 == 0 else READERS[::-1]):
                    torch.manual_seed(repeat)
                    if reader == "ImageFolder":
                        make = partial(imagefolder_loader, root / "folder", settings, scale)
                    else:
                        make = partial(shard_loader, urls, settings, scale, seed=repeat)
                    runs[reader].append(time_loader(make, settings.batches, settings.batch_size))
            for reader, results in runs.items():
                rows.append({
                    "reader": reader,
                    "scale": list(scale),
                    "images_per_s_median": statistics.median(r["images_per_s"] for r in results),
                    "steady_images_per_s_median": statistics.median(r["steady_images_per_s"] for r in results),
                    "cpu_ms_per_image_median": statistics.median(r["cpu_ms_per_image"] for r in results),
                    "runs": results,
                })
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "libjpeg_turbo": bool(features.check("libjpeg_turbo")),
    }
    return {"settings": asdict(settings), "machine": machine, "rows": rows}


def bench_data(case: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's ``data`` section: the comparison at its resolution, vistok's crop scale only.

    Its progress lines go to stderr, beside the benchmark's own.
    """
    s = case["settings"]
    settings = DataBenchSettings(images=s["images"], workers=s["workers"], batch_size=s["batch_size"],
                                 batches=s["batches"], size=s["image_size"], repeats=s["repeats"], scales=[(0.8, 1.0)])
    result = compare_loaders(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = {row["reader"]: row for row in result["rows"]}
    shards, folder = rows["shards"], rows["ImageFolder"]
    return {
        "images_per_s": shards["images_per_s_median"],
        "steady_images_per_s": shards["steady_images_per_s_median"],
        "imagefolder_images_per_s": folder["images_per_s_median"],
        "imagefolder_steady_images_per_s": folder["steady_images_per_s_median"],
        "settings": s, "rows": result["rows"], "machine": result["machine"],
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'reader':<12} {'scale':<9} {'img/s':>7} {'img/s steady':>13} {'CPU ms/img':>11}   "
        "per repeat: img/s | CPU ms/img"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        per_run = ", ".join(f"{r['images_per_s']:.0f}" for r in row["runs"])
        per_cpu = ", ".join(f"{r['cpu_ms_per_image']:.1f}" for r in row["runs"])
        scale = f"{row['scale'][0]:g}-{row['scale'][1]:g}"
        lines.append(
            f"{row['reader']:<12} {scale:<9} {row['images_per_s_median']:>7.1f} "
            f"{row['steady_images_per_s_median']:>13.1f} {row['cpu_ms_per_image_median']:>11.2f}   "
            f"{per_run} | {per_cpu}"
        )
    lines.append("(medians over repeats; img/s is wall clock, CPU ms/img counts the workers' CPU time too)")
    return "\n".join(lines)


def _range(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, Any]]:
    def parse(text: str) -> tuple[Any, Any]:
        try:
            low, high = (kind(x) for x in text.split("-"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LOW-HIGH such as 0.8-1.0, got {text!r}") from None
        return low, high
    return parse


def _ranges(text: str) -> list[tuple[float, float]]:
    return [_range(float)(item) for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    defaults = DataBenchSettings()
    parser = argparse.ArgumentParser(prog="python -m vistok.eval.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=defaults.images, help="JPEGs to generate (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="DataLoader workers for both (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--batches", type=int, default=defaults.batches, help="batches timed per run (default: %(default)s)")
    parser.add_argument("--size", type=int, default=defaults.size, help="crop resolution (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer)
    parser.add_argument("--scales", type=_ranges, default=defaults.scales,
                        help="RandomResizedCrop area ranges to time, comma separated "
                             "(default: vistok's 0.8-1.0 and torchvision's 0.08-1.0)")
    parser.add_argument("--sides", type=_range(int), default=defaults.sides,
                        help="shorter-side range of the generated JPEGs in pixels (default: 300-500)")
    parser.add_argument("--dir", default=None, help="where to write the images and shards (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_data.json"),
                        help="JSON result file (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    out = args.pop("out")
    try:
        result = compare_loaders(DataBenchSettings(**args))
    except VistokError as error:
        print(f"python -m vistok.eval.bench.data: error: {error}", file=sys.stderr)
        return 2
    print(format_table(result["rows"]))
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from vistok import hide_checkout

    hide_checkout()
    sys.exit(main())
