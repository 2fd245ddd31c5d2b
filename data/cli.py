"""``vistok shards SRC OUT``: write a folder of images as webdataset shards with a JSON index."""
from __future__ import annotations

import argparse
import logging
import sys

from vistok.data.shards import INDEX_NAME, write_shards


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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


def run(args: argparse.Namespace) -> int:
    # Skipped files are reported through logging; make them one plain line each on stderr.
    logger = logging.getLogger("data")
    handler = None
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"vistok {args.command}: warning: %(message)s"))
        logger.addHandler(handler)
    try:
        index = write_shards(
            args.source, args.out, args.samples_per_shard, max_size=args.max_size, resize=args.resize,
            image_format=args.image_format, quality=args.quality, workers=args.workers, overwrite=args.overwrite,
        )
    finally:
        if handler is not None:
            logger.removeHandler(handler)
    skipped = index["skipped"]["count"]
    print(
        f"wrote {index['total']} images in {index['num_shards']} shards to {args.out}/{index['pattern']}"
        f" ({skipped} file{'s' if skipped != 1 else ''} skipped); index: {args.out}/{INDEX_NAME}"
    )
    return 0
