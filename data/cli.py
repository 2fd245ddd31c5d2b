"""``vistok shards SRC OUT``: write a folder of images as webdataset shards with a JSON index."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, TextIO

from vistok.data.shards import INDEX_NAME, write_shards


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 such as 0.02, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 such as 0.02, got {value}")
    return value


class Progress:
    """``progress(done, total)`` for the shard writer: a bar on a terminal, else a line on every
    tenth of the files or every ``interval`` seconds, whichever comes first (logs stay short)."""

    def __init__(self, stream: TextIO, prefix: str, interval: float = 60.0):
        self.stream, self.prefix, self.interval = stream, prefix, interval
        self.bar: Any = None
        self.terminal = stream.isatty()
        self.start = self.last_time = time.monotonic()
        self.last_done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.terminal:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", desc="writing shards", file=self.stream)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if done == total or done - self.last_done >= max(1, total // 10) or now - self.last_time >= self.interval:
            rate = done / max(now - self.start, 1e-9)
            print(f"{self.prefix}{done}/{total} images ({done / total:.0%}, {rate:.0f} images/s)", file=self.stream, flush=True)
            self.last_done, self.last_time = done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("source", metavar="SRC", help="folder of images (jpg, png, webp, bmp, tif; nested folders ok)")
    parser.add_argument("out", metavar="OUT", help="folder for shard-000000.tar, ... and index.json")
    parser.add_argument(
        "--samples-per-shard", type=_positive, default=1000, metavar="N", help="images per shard (default: 1000)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--max-size", type=_positive, default=None, metavar="N",
        help="downscale images whose longer side exceeds N pixels (aspect ratio kept)",
    )
    size.add_argument(
        "--resize", type=_positive, default=None, metavar="N",
        help="resize the shorter side to N and centre-crop to N x N",
    )
    parser.add_argument(
        "--format", dest="image_format", choices=("jpeg", "png"), default="jpeg",
        help="encoding for converted or resized images (default: jpeg; JPEG sources that need no "
        "resizing are always stored byte for byte)",
    )
    parser.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality (default: 95)")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="encoding processes (default: number of CPUs, at most 8; 0 = in this process)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument(
        "--labels", choices=("folder",), default=None,
        help="class labels: 'folder' takes each image's top-level folder under SRC as its class (as torchvision's "
        "ImageFolder), writes it as the sample's cls member and the class names in index.json (vistok probe is "
        "then class-conditional)",
    )
    parser.add_argument(
        "--val-fraction", type=_fraction, default=None, metavar="F",
        help="hold out this share of the images (e.g. 0.02), chosen by a hash of their names: writes OUT/train "
        "and OUT/val, each with its own shards and index.json",
    )


def run(args: argparse.Namespace) -> int:
    # Skipped files are reported through logging; make them one plain line each on stderr.
    logger = logging.getLogger("data")
    handler = None
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"vistok {args.command}: warning: %(message)s"))
        logger.addHandler(handler)
    progress = Progress(sys.stderr, f"vistok {args.command}: ")
    try:
        written = write_shards(
            args.source, args.out, args.samples_per_shard, max_size=args.max_size, resize=args.resize,
            image_format=args.image_format, quality=args.quality, workers=args.workers, overwrite=args.overwrite,
            val_fraction=args.val_fraction, labels=args.labels, progress=progress,
        )
    finally:
        progress.close()
        if handler is not None:
            logger.removeHandler(handler)
    splits = {"": written} if args.val_fraction is None else {f"{name}/": index for name, index in written.items()}
    for folder, index in splits.items():
        skipped = index["skipped"]["count"]
        print(
            f"wrote {index['total']} images in {index['num_shards']} shards to {args.out}/{folder}{index['pattern']}"
            f" ({skipped} file{'s' if skipped != 1 else ''} skipped); index: {args.out}/{folder}{INDEX_NAME}"
        )
    return 0
