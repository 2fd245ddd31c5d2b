"""Throughput of the training stream: vistok's shard reader vs torchvision's ImageFolder.

    python -m vistok.data.bench [--images 400] [--workers 2] [--batch-size 32] [--batches 40] [--repeats 3]

Makes ``--images`` ImageNet-like JPEGs (shorter side 300-500 px, quality 90, 4:2:0) from
scikit-image's bundled photographs, stores them once as an ImageFolder tree and once as
shards (``vistok shards``, which keeps JPEG bytes unchanged, so both read identical files),
then times ``--batches`` batches of random-resized 256x256 crops + horizontal flip + float
[0, 1] tensors through each, with the same worker count, in the same run, alternating the
order across repeats. ImageFolder samples with replacement, so neither side restarts its
workers mid-run. Reported: images/s over the whole run (worker start-up included), after the
first batch (steady state), and CPU milliseconds per image summed over the main process and
the workers (the fair figure on a machine shared with other jobs). Prints a table and
writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import gc
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

from vistok.data.datamodule import make_train_loader
from vistok.data.sample import SAMPLE_PHOTOS, load_photo
from vistok.data.shards import write_shards
from vistok.tokenizers.atomic import atomic_write_json


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


def time_loader(make_loader, batches: int, batch_size: int) -> dict:
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


def imagefolder_loader(folder: Path, args: argparse.Namespace, scale: tuple[float, float]):
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(
            args.size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=args.batches * args.batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True
    )


def shard_loader(urls: list[str], args: argparse.Namespace, scale: tuple[float, float], seed: int):
    return make_train_loader(
        urls, image_size=args.size, batch_size=args.batch_size, batches_per_epoch=args.batches,
        num_workers=args.workers, shuffle_buffer_size=args.shuffle_buffer, crop="random_resized",
        scale=scale, ratio=(3 / 4, 4 / 3), hflip=True, seed=seed,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vistok.data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="JPEGs to generate (default: 400)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per run (default: 40)")
    parser.add_argument("--size", type=int, default=256, help="crop resolution (default: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shuffle-buffer", type=int, default=200)
    parser.add_argument(
        "--scales", default="0.8-1.0,0.08-1.0",
        help="RandomResizedCrop area ranges to time, comma separated (default: vistok's 0.8-1.0 and torchvision's 0.08-1.0)",
    )
    parser.add_argument(
        "--sides", default="300-500", help="shorter-side range of the generated JPEGs in pixels (default: 300-500)"
    )
    parser.add_argument("--dir", default=None, help="where to write the images and shards (default: a temporary folder)")
    parser.add_argument("--out", default="outputs/bench_data.json", help="JSON result file")
    args = parser.parse_args(argv)
    scales = [tuple(float(x) for x in item.split("-")) for item in args.scales.split(",")]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sides = tuple(int(x) for x in args.sides.split("-"))
        make_images(root / "folder", args.images, sides)
        index = write_shards(root / "folder", root / "shards", samples_per_shard=100, workers=0)
        urls = [str(root / "shards" / s["name"]) for s in index["shards"]]
        folder_bytes = sum(p.stat().st_size for p in (root / "folder").rglob("*.jpg"))
        print(f"made {args.images} JPEGs ({folder_bytes / 1e6:.1f} MB) and {len(urls)} shards in {time.perf_counter() - t0:.1f} s")

        rows = []
        for scale in scales:
            runs: dict[str, list[dict]] = {"ImageFolder": [], "shards": []}
            for repeat in range(args.repeats):
                order = ("ImageFolder", "shards") if repeat % 2 == 0 else ("shards", "ImageFolder")
                for name in order:
                    torch.manual_seed(repeat)
                    if name == "ImageFolder":
                        make = partial(imagefolder_loader, root / "folder", args, scale)
                    else:
                        make = partial(shard_loader, urls, args, scale, seed=repeat)
                    runs[name].append(time_loader(make, args.batches, args.batch_size))
            for name, results in runs.items():
                rows.append({
                    "reader": name,
                    "scale": list(scale),
                    "images_per_s_median": statistics.median(r["images_per_s"] for r in results),
                    "steady_images_per_s_median": statistics.median(r["steady_images_per_s"] for r in results),
                    "cpu_ms_per_image_median": statistics.median(r["cpu_ms_per_image"] for r in results),
                    "runs": results,
                })

    header = (
        f"{'reader':<12} {'scale':<9} {'img/s':>7} {'img/s steady':>13} {'CPU ms/img':>11}   "
        "per repeat: img/s | CPU ms/img"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        per_run = ", ".join(f"{r['images_per_s']:.0f}" for r in row["runs"])
        per_cpu = ", ".join(f"{r['cpu_ms_per_image']:.1f}" for r in row["runs"])
        scale = f"{row['scale'][0]:g}-{row['scale'][1]:g}"
        print(
            f"{row['reader']:<12} {scale:<9} {row['images_per_s_median']:>7.1f} "
            f"{row['steady_images_per_s_median']:>13.1f} {row['cpu_ms_per_image_median']:>11.2f}   "
            f"{per_run} | {per_cpu}"
        )
    print("(medians over repeats; img/s is wall clock, CPU ms/img counts the workers' CPU time too)")
    result = {
        "settings": {k: v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": Image.__version__,
            "libjpeg_turbo": bool(features.check("libjpeg_turbo")),
        },
        "rows": rows,
    }
    out = Path(args.out)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
