"""``vistok import FORMAT SRC OUT [format flags] [--force]``: write a released tokenizer as a vistok export."""
from __future__ import annotations

import argparse
from pathlib import Path

from vistok.tokenizers.imports import FORMATS, converter


def add_arguments(parser: argparse.ArgumentParser, name: str = "import") -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for fmt, (_, help_text) in FORMATS.items():
        sub = formats.add_parser(fmt, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        sub.add_argument("src", metavar="SRC", help="the file or folder as the project publishes it")
        sub.add_argument("out", metavar="OUT", help="directory to write the vistok export to")
        sub.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
        converter(fmt).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    from vistok.tokenizers.imports.common import write_import

    imported = converter(args.format).convert(Path(args.src), args)
    out = write_import(imported, args.src, args.out, force=args.force)
    model = imported.tokenizer
    codebook = f"{model.codebook_size:,} codes" if model.codebook_size is not None else f"continuous tokens of dimension {model.token_dim}"
    print(f"imported {args.format} {args.src} -> {out}: {model.arch}, {model.image_size}x{model.image_size} px, "
          f"{model.max_tokens} tokens, {codebook}, {sum(p.numel() for p in model.parameters()):,} parameters")
    for note in imported.source.get("notes", []):
        print(f"  note: {note}")
    return 0
