"""`vistok probe`: a thin layer over :mod:`vistok.eval.probe`."""
from __future__ import annotations

import argparse
from pathlib import Path

from vistok.tokenizers.errors import VistokError

EPILOG = """examples:
  vistok probe runs/tok/export --train sample --val sample --steps 1000
  vistok probe tok.ckpt --train 'imagenet/train-{0000..0099}.tar' --val 'imagenet/val-{00..09}.tar' --model base --device cuda

Both sets are encoded once; the tokens are cached as webdataset shards under --cache (keyed by
tokenizer, data and token count), so probing the same tokenizer and data again skips encoding.
Shards whose samples carry a `cls` member make the probe class-conditional and add linear-probe
accuracy. gFID needs the FID Inception weights in the torch hub cache (or --inception-weights)."""


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("tokenizer", metavar="TOKENIZER", help="exported tokenizer directory or training .ckpt")
    parser.add_argument("--train", required=True, metavar="DATA", help="training images: folder, image file, shard URL(s) or 'sample' (its training split)")
    parser.add_argument("--val", required=True, metavar="DATA", help="validation images, as --train ('sample': its validation split)")
    parser.add_argument("--num-tokens", metavar="K[,K...]", help="prefix lengths to report; the longest is modelled (default: powers of two up to the maximum, plus it; the full grid for 2D tokenizers)")
    parser.add_argument("--model", default="tiny", metavar="SIZE", help="probe size from configs/probe/: tiny (CPU), small, base (default tiny)")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps of the probe (default: trainer.max_steps of configs/probe_train.yaml)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default outputs/probe/<run>-<name>)")
    parser.add_argument("--cache", default="outputs/probe/cache", metavar="DIR", help="token cache folder (default outputs/probe/cache)")
    parser.add_argument("--resume", action="store_true", help="continue the probe trained in --out (or only evaluate it again when finished)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting of configs/probe_train.yaml, e.g. --set optim.lr=3e-4 --set trainer=ddp (repeatable)")
    parser.add_argument("--limit", type=int, metavar="N", help="use at most N images of each set")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per encoding/decoding batch (default 64)")
    parser.add_argument("--samples", type=int, default=64, metavar="N", help="AR samples decoded for the grid and gFID (default 64; 0: none)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample each (sub-)code from its K most likely values (default: all)")
    parser.add_argument("--inception-weights", metavar="PATH", help="FID Inception weights file (default: the torch hub cache)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu); cuda trains with trainer=gpu")


def run(args: argparse.Namespace) -> int:
    from vistok.eval.probe import probe_tokenizer, summary
    from vistok.eval.cli import default_name
    from vistok.tokenizers.device import resolve_device

    resolve_device(args.device)
    tokenizer = Path(args.tokenizer)
    if not tokenizer.exists():
        raise VistokError(f"the tokenizer {tokenizer} does not exist; pass an exported tokenizer directory (vistok export) or a training .ckpt.")
    out = Path(args.out) if args.out else Path("outputs") / "probe" / default_name(tokenizer)
    report = probe_tokenizer(tokenizer, args.train, args.val, num_tokens=args.num_tokens, model=args.model, steps=args.steps,
                             out_dir=out, cache_dir=args.cache, limit=args.limit, batch_size=args.batch_size, device=args.device,
                             resume=args.resume, overrides=args.set, num_samples=args.samples, temperature=args.temperature,
                             top_k=args.top_k, inception_weights=args.inception_weights)
    if report:
        print(summary(report))
    return 0
