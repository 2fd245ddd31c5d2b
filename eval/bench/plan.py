"""The benchmark's cases: what the command line asks for, as a list of plain dicts in run order.

A case is a JSON-like dict (it travels to a child process): ``section`` (train, codec,
quantizer, data), the device as a string, the timing settings and the section's own.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from vistok.eval.bench.codec import bench_codec
from vistok.eval.bench.data import bench_data
from vistok.eval.bench.quantizers import quantizer_config
from vistok.eval.bench.train_step import bench_train
from vistok.tokenizers.errors import VistokError

SECTIONS = ("train", "codec", "quantizers", "data")
DEFAULT_MODELS = ("titok:tiny", "titok:small", "titok:base", "conv:tiny", "conv:f8", "conv:f16")
# The function that measures a case of each section ("quantizer" cases are pairs: compare_quantizer).
CASE_FUNCTIONS = {"train": bench_train, "codec": bench_codec, "data": bench_data}


def parse_model(text: str) -> tuple[str, str]:
    """``"titok:base"`` -> ``("titok", "base")``."""
    arch, _, preset = text.partition(":")
    if not preset:
        raise VistokError(f"model {text!r} is not ARCH:PRESET; write e.g. titok:base or conv:f8.")
    return arch, preset


def train_quantizer(text: str | None) -> dict[str, Any] | None:
    """``--train-quantizer``: None (the model's own), a JSON config, or a name at TiTok-like settings."""
    if not text:
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise VistokError(f"--train-quantizer is not valid JSON ({error}); pass a JSON object or a name.") from None
    size = {"vq": 4096, "vq-ema": 4096, "lfq": 2**14, "softvq": 4096}.get(text, 0)
    return quantizer_config(text, size, 12, [8, 8, 8, 5, 5, 5])


def build_plan(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The cases the (resolved) arguments ask for, in run order."""
    cuda = device.type == "cuda"
    common = {"device": str(device), "warmup": args.warmup, "repeats": args.repeats, "budget": args.budget,
              "threads": args.threads}
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    compile_modes = {"auto": [False, True] if cuda else [False], "off": [False], "on": [True],
                     "both": [False, True]}[args.compile]
    quantizer = train_quantizer(args.train_quantizer)
    cases: list[dict[str, Any]] = []
    if "train" in args.sections:
        for model in args.models:
            arch, preset = parse_model(model)
            for compiled in compile_modes:
                cases.append({**common, "section": "train", "arch": arch, "preset": preset, "batch": args.batch,
                              "image_size": args.image_size, "precision": precision, "compile": compiled,
                              "quantizer": quantizer, "peak_tflops": args.peak_tflops})
    if "codec" in args.sections:
        for model in args.codec_models or args.models:
            arch, preset = parse_model(model)
            cases.append({**common, "section": "codec", "arch": arch, "preset": preset, "batch": args.batch,
                          "image_size": args.image_size, "precision": precision, "quantizer": quantizer,
                          "prefix_batch": args.prefix_batch})
    if "quantizers" in args.sections:
        sizes = {"vq": args.vq_codes, "vq-ema": args.vq_codes, "fsq": [math.prod(args.fsq_levels)],
                 "lfq": [2**b for b in args.lfq_bits], "softvq": args.softvq_codes}
        for kind in args.quantizers:
            for size in sizes[kind]:
                cases.append({**common, "section": "quantizer", "kind": kind, "size": size,
                              "reference": not args.no_reference and kind != "softvq",
                              "shape": list(args.quantizer_shape), "dim": args.vq_dim, "levels": list(args.fsq_levels)})
    if "data" in args.sections:
        cases.append({**common, "section": "data", "settings": {
            "images": args.data_images, "workers": args.data_workers, "batch_size": args.data_batch,
            "batches": args.data_batches, "image_size": args.image_size, "repeats": 3}})
    return cases


def case_label(case: dict[str, Any]) -> str:
    if case["section"] in ("train", "codec"):
        extra = " compiled" if case.get("compile") else ""
        return f"{case['section']} {case['arch']}:{case['preset']}{extra}"
    if case["section"] == "quantizer":
        return f"quantizer {case['kind']} at {case['size']} codes"
    return case["section"]
