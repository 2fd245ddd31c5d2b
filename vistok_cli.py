"""The ``vistok`` command line: a thin dispatcher over library functions.

This module lives outside ``tokenizers/`` on purpose: Hugging Face's ``tokenizers`` library has
the same import name, and the check that ours is the one Python finds must run before anything
is imported from ``tokenizers``. Subcommand modules are imported only when their command runs,
so ``vistok --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

# name -> (module with add_arguments(parser) and run(args) -> int | None, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("data.cli", "write a folder of images as webdataset shards with a JSON index"),
    "export": ("tokenizers.cli", "turn a training checkpoint into a standalone tokenizer directory"),
    "encode": ("tokenizers.cli", "encode images into token indices (or soft codes) in an .npz file"),
    "decode": ("tokenizers.cli", "decode an .npz of tokens (any prefix) into PNG images"),
    "info": ("tokenizers.cli", "print a tokenizer's configuration and recorded metrics"),
    "score": ("eval.cli", "score a tokenizer (rFID, PSNR, SSIM, LPIPS, rate-distortion) or two image folders"),
}

_OWN_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers" / "__init__.py"


def tokenizers_shadow_message() -> str | None:
    """One sentence if ``import tokenizers`` would not load this project's package, else None.

    Uses ``find_spec`` so nothing is imported (importing Hugging Face's library to find out
    would be slow and may fail on its own).
    """
    try:
        spec = importlib.util.find_spec("tokenizers")
    except (ImportError, ValueError):
        spec = None
    found = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if found == _OWN_TOKENIZERS:
        return None
    where = str(found) if found else "nothing"
    return (
        f"'import tokenizers' finds {where} instead of vistok's package at {_OWN_TOKENIZERS.parent} "
        "(Hugging Face's tokenizers library has the same name): install vistok into its own virtual "
        "environment as README.md shows (python -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]')."
    )


def ensure_own_tokenizers(prog: str = "vistok") -> None:
    """Exit with status 2 and one sentence when ``tokenizers`` resolves to another package."""
    message = tokenizers_shadow_message()
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistok",
        description="vistok: train, evaluate and export visual tokenizers. Training is `python train.py ...`.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if name == chosen:  # only the chosen command pays for its imports
            module = importlib.import_module(module_name)
            module.add_arguments(p, name)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    ensure_own_tokenizers()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"vistok {version('vistok')}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from tokenizers.errors import VistokError

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
