"""`vistok score`: a thin layer over :mod:`vistok.eval.score`."""
from __future__ import annotations

import argparse
from pathlib import Path

from vistok.tokenizers.errors import VistokError

EPILOG = """examples:
  vistok score runs/tok/export sample --limit 256
  vistok score last.ckpt images/ --num-tokens 8,16,32 --target-psnr 30 --out scores/tok
  vistok score runs/tok/export sample --perturb 0.05,0.1,0.2 --perturb-kind nearest
  vistok score --reference originals/ --reconstructions other_model/

Images are resized so the shorter side is the tokenizer's size (bicubic) and centre-cropped;
--no-resize refuses images of another size instead. rFID and LPIPS need weights in the torch
hub cache (or --inception-weights / --lpips-weights); without them they are skipped with a note."""


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("tokenizer", nargs="?", metavar="TOKENIZER", help="exported tokenizer directory or training .ckpt")
    parser.add_argument("data", nargs="?", metavar="DATA", help="folder of images, image file, shard URL(s), or 'sample'")
    parser.add_argument("--num-tokens", metavar="K,K,...", help="token counts to score (default: powers of two up to the maximum, plus it)")
    parser.add_argument("--limit", type=int, metavar="N", help="score at most N images")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per batch (default 16)")
    parser.add_argument("--inception-weights", metavar="PATH", help="FID Inception weights file (default: the torch hub cache)")
    parser.add_argument("--lpips-weights", metavar="PATH", help="torchvision VGG16 weights for LPIPS (default: the torch hub cache)")
    parser.add_argument("--target-psnr", type=float, metavar="DB", help="also pick per image the fewest tokens reaching this PSNR")
    parser.add_argument("--perturb", metavar="R,R,...", help="also decode with this fraction of each image's tokens replaced by other codes, "
                        "one row per rate beside the clean one, e.g. 0.05,0.1,0.2 (discrete tokens)")
    parser.add_argument("--perturb-kind", choices=("random", "nearest"),
                        help="replacement codes: random (uniform, the default) or nearest (VQ: one of the k nearest, FSQ: a grid neighbour, LFQ: one flipped bit)")
    parser.add_argument("--perturb-k", type=int, metavar="K", help="nearest for VQ: draw among the K nearest codes (default 8)")
    parser.add_argument("--seed", type=int, help="seed of the perturbation's draws (default 0)")
    parser.add_argument("--out", metavar="DIR", help="output folder, created before scoring (default outputs/score/<run>-<name>, e.g. outputs/score/a-last for runs/a/checkpoints/last.ckpt)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--no-resize", action="store_true", help="refuse images whose size differs instead of resizing them")
    parser.add_argument("--codecs", default="jpeg,webp,thumbnail", metavar="LIST",
                        help="baselines at the tokens' rate: jpeg,webp,thumbnail (default), a subset, or none")
    parser.add_argument("--examples", type=int, default=8, metavar="N", help="images in the reconstruction grid (default 8)")
    parser.add_argument("--reference", metavar="DIR", help="folder of original images (with --reconstructions)")
    parser.add_argument("--reconstructions", metavar="DIR", help="folder of reconstructions named like their originals")


def _codecs(value: str) -> tuple[str, ...]:
    from vistok.eval.rate_distortion import BASELINES

    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise VistokError(f"--codecs does not know {unknown[0]!r}; use a comma-separated list of {', '.join(BASELINES)}, or none.")
    return names


def default_name(tokenizer: Path) -> str:
    """The default output folder name for a tokenizer path, unique per run: the run folder's name
    joined to the file's (runs/a/checkpoints/last.ckpt -> a-last, runs/a/export -> a-export), so
    every run's last.ckpt gets its own report instead of all sharing outputs/score/last."""
    path = tokenizer.resolve()
    stem = path.name if path.is_dir() else path.stem
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    parts = [part for part in (run_dir.name, stem) if part]
    return "-".join(parts) or "tokenizer"


def run(args: argparse.Namespace) -> int:
    folder_mode = args.reference is not None or args.reconstructions is not None
    if folder_mode:
        if args.reference is None or args.reconstructions is None:
            raise VistokError("--reference and --reconstructions go together; pass both folders.")
        if args.tokenizer is not None:
            raise VistokError("pass either TOKENIZER DATA or --reference DIR --reconstructions DIR, not both.")
    elif args.tokenizer is None or args.data is None:
        raise VistokError("pass a TOKENIZER (exported directory or .ckpt) and DATA (image folder, shards or 'sample'), "
                          "or --reference DIR --reconstructions DIR.")
    given = [flag for flag, value in (("--perturb-kind", args.perturb_kind), ("--perturb-k", args.perturb_k), ("--seed", args.seed))
             if value is not None]
    if given and args.perturb is None:
        raise VistokError(f"{given[0]} sets up token perturbation; add --perturb RATES (e.g. 0.05,0.1,0.2) or drop {given[0]}.")
    if folder_mode and args.perturb is not None:
        raise VistokError("--perturb decodes a tokenizer's perturbed tokens, so it needs TOKENIZER DATA, not image folders.")

    from vistok.eval.score import score_folders, score_tokenizer, summary
    from vistok.tokenizers.device import resolve_device

    resolve_device(args.device)  # before any loading: a missing GPU is the first thing to hear about
    common = dict(limit=args.limit, batch_size=args.batch_size, device=args.device, inception_weights=args.inception_weights,
                  lpips_weights=args.lpips_weights, resize=not args.no_resize)
    if folder_mode:
        out = Path(args.out) if args.out else Path("outputs") / "score" / (Path(args.reconstructions).resolve().name or "folders")
        report = score_folders(args.reference, args.reconstructions, out_dir=out, **common)
    else:
        tokenizer = Path(args.tokenizer)
        if not tokenizer.exists():
            raise VistokError(f"the tokenizer {tokenizer} does not exist; pass an exported tokenizer directory (vistok export) or a training .ckpt.")
        out = Path(args.out) if args.out else Path("outputs") / "score" / default_name(tokenizer)
        report = score_tokenizer(tokenizer, args.data, args.num_tokens, target_psnr=args.target_psnr, out_dir=out,
                                 codecs=_codecs(args.codecs), num_examples=args.examples, perturb=args.perturb,
                                 perturb_kind=args.perturb_kind or "random", perturb_k=args.perturb_k,
                                 seed=0 if args.seed is None else args.seed, **common)
    print(summary(report))
    return 0
