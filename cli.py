"""The ``vistok`` command line: a thin dispatcher over library functions.

``vistok train [Hydra overrides]`` hands its arguments to :mod:`vistok.train` unparsed (Hydra
reads them, flags such as ``-m`` and ``--config-dir`` included). The other subcommands are
argparse commands whose modules are imported only when they run, so ``vistok --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from vistok import hide_checkout

# name -> (module with add_arguments(parser, name) and run(args) -> int | None, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vistok.train", "train a tokenizer: vistok train [experiment=NAME] [group=option ...] [key=value ...]"),
    "shards": ("vistok.data.cli", "write a folder of images as webdataset shards with a JSON index"),
    "export": ("vistok.tokenizers.cli", "turn a training checkpoint into a standalone tokenizer directory"),
    "encode": ("vistok.tokenizers.cli", "encode images into token indices (or soft codes) in an .npz file"),
    "decode": ("vistok.tokenizers.cli", "decode an .npz of tokens (any prefix) into PNG images"),
    "info": ("vistok.tokenizers.cli", "print a tokenizer's configuration and recorded metrics"),
    "import": ("vistok.tokenizers.imports.cli", "convert a released tokenizer (TiTok, LlamaGen, Open-MAGVIT2) into a vistok export"),
    "score": ("vistok.eval.cli", "score a tokenizer (rFID, PSNR, SSIM, LPIPS, rate-distortion) or two image folders"),
    "probe": ("vistok.eval.probe_cli", "train a small AR model on a tokenizer's tokens: bits per token vs unigram, samples, gFID"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistok",
        description="vistok: train, evaluate and export visual tokenizers.",
        epilog="`vistok train --help` shows the training settings (Hydra); in a checkout, `python train.py` is the same command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if name == chosen and name != "train":  # only the chosen command pays for its imports
            module = importlib.import_module(module_name)
            module.add_arguments(p, name)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    hide_checkout()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from vistok.train import main as train

        return train(argv[1:], prog="vistok train")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from vistok.tokenizers.export import vistok_version

        print(f"vistok {vistok_version()}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from vistok.tokenizers.errors import VistokError

    try:
        return int(args._run(args) or 0)
    except VistokError as error:
        print(f"vistok {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vistok {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `vistok info ... | head` closed our stdout: not an error of ours, and no traceback.
        # Python's documented recipe: point stdout at devnull so the flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
