"""``python -m vistok.eval.bench``: arguments, the run over the planned cases, the JSON and the tables."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import vistok.eval.bench as package
from vistok.eval.bench import quantizers
from vistok.eval.bench.isolate import run_case, run_isolated
from vistok.eval.bench.measure import available_memory_bytes
from vistok.eval.bench.plan import CASE_FUNCTIONS, DEFAULT_MODELS, SECTIONS, build_plan, case_label, parse_model
from vistok.eval.bench.quantizers import QUANTIZER_KINDS, REFERENCE_PACKAGE, compare_quantizer
from vistok.eval.bench.tables import format_report
from vistok.eval.bench.targets import evaluate_targets
from vistok.tokenizers.atomic import atomic_write_text
from vistok.tokenizers.device import resolve_device
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.export import vistok_version

PROG = "python -m vistok.eval.bench"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS such as 32x256, got {text!r}") from None
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"BATCHxTOKENS must be positive, got {text!r}")
    return batch, length


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=package.__doc__.split("\n\n")[0],
        epilog="Defaults depend on the device: a CPU run is sized to finish in minutes on a laptop-class machine; "
               "on CUDA batch 32 at 256 px. The data section's own options: python -m vistok.eval.bench.data --help.")
    parser.add_argument("--sections", type=_csv(str), default=list(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--models", type=_csv(str), default=list(DEFAULT_MODELS),
                        help="ARCH:PRESET list for train and codec (default: %(default)s)")
    parser.add_argument("--codec-models", type=_csv(str), default=None,
                        help="ARCH:PRESET list for the codec section (default: CPU tiny presets, CUDA --models)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: CPU 2, CUDA 32)")
    parser.add_argument("--image-size", type=int, default=None, help="resolution in px (default: CPU 64, CUDA 256)")
    parser.add_argument("--prefix-batch", type=int, default=None,
                        help="images whose every prefix is decoded at once (default: CPU 1, CUDA 4)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="autocast precision (auto: bf16 on CUDA, fp32 on CPU); quantizers always run in fp32")
    parser.add_argument("--compile", choices=["auto", "off", "on", "both"], default="auto",
                        help="torch.compile the model for training steps (auto: both on CUDA, off on CPU)")
    parser.add_argument("--train-quantizer", default=None,
                        help="quantizer of the train/codec models: a name (vq, fsq, lfq, softvq) or a JSON config "
                             "(default: the model's, FSQ [8,5,5,5])")
    parser.add_argument("--quantizers", type=_csv(str), default=["vq", "fsq", "lfq", "softvq"],
                        help=f"quantizers to compare, of {', '.join(QUANTIZER_KINDS)} (default: %(default)s)")
    parser.add_argument("--quantizer-shape", type=_shape, default=(32, 256),
                        help="BATCHxTOKENS of the quantizer latents (default: 32x256 = 8192 tokens)")
    parser.add_argument("--vq-codes", type=_csv(int), default=[4096, 16384, 65536], help="VQ codebook sizes")
    parser.add_argument("--vq-dim", type=int, default=12, help="VQ / SoftVQ code dimension (default: 12, as TiTok)")
    parser.add_argument("--fsq-levels", type=_csv(int), default=[8, 8, 8, 5, 5, 5],
                        help="FSQ levels (default: 8,8,8,5,5,5 = 64000 codes)")
    parser.add_argument("--lfq-bits", type=_csv(int), default=[14, 16, 18], help="LFQ bits (codebook 2^bits)")
    parser.add_argument("--softvq-codes", type=_csv(int), default=[4096], help="SoftVQ codebook sizes")
    parser.add_argument("--no-reference", action="store_true", help=f"skip {REFERENCE_PACKAGE}")
    parser.add_argument("--data-workers", type=int, default=2, help="data loader workers (default: %(default)s)")
    parser.add_argument("--data-batch", type=int, default=32, help="data loader batch size (default: %(default)s)")
    parser.add_argument("--data-images", type=int, default=None,
                        help="JPEGs the data section makes (default: CPU 128, CUDA 400)")
    parser.add_argument("--data-batches", type=int, default=None, help="batches timed per data run (default: CPU 10, CUDA 40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default: CPU 1, CUDA 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default: CPU 3, CUDA 20)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed steps per case before stopping early (default: CPU 10, CUDA 20)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); on a shared machine 1 gives stable comparisons")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak TFLOP/s for MFU (default: a table of known GPUs, bf16 dense)")
    parser.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                        help="run each case in a fresh process (auto: on CPU, where it is how peak memory is read)")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="stop a CPU case whose memory passes this (default: 80%% of available memory)")
    parser.add_argument("--output", type=Path, default=Path("bench.json"), help="JSON results (default: %(default)s)")
    return parser


def resolve_arguments(args: argparse.Namespace) -> torch.device:
    """Fill device-dependent defaults and check the arguments; returns the device."""
    device = resolve_device(args.device, flag="--device")
    args.device = str(device)
    cuda = device.type == "cuda"
    defaults = {"batch": 32 if cuda else 2, "image_size": 256 if cuda else 64, "prefix_batch": 4 if cuda else 1,
                "warmup": 3 if cuda else 1, "data_images": 400 if cuda else 128,
                "data_batches": 40 if cuda else 10, "repeats": 20 if cuda else 3, "budget": 20.0 if cuda else 10.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.codec_models is None and not cuda:
        args.codec_models = [m for m in args.models if m.endswith(":tiny")] or args.models[:1]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        raise VistokError(f"unknown section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}.")
    unknown = sorted(set(args.quantizers) - set(QUANTIZER_KINDS))
    if unknown:
        raise VistokError(f"unknown quantizer(s) {', '.join(unknown)}; use some of {', '.join(QUANTIZER_KINDS)}.")
    for name in ("batch", "image_size", "prefix_batch", "repeats", "vq_dim", "data_images", "data_batches",
                 "data_batch"):
        if getattr(args, name) < 1:
            raise VistokError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        raise VistokError(f"--threads must be at least 1, got {args.threads}.")
    if args.warmup < 0 or args.data_workers < 0 or args.budget <= 0:
        raise VistokError("--warmup and --data-workers must be >= 0 and --budget positive.")
    if any(b < 1 for b in args.lfq_bits) or any(c < 1 for c in args.vq_codes + args.softvq_codes):
        raise VistokError("--lfq-bits and codebook sizes must be positive.")
    if args.train_quantizer and not args.train_quantizer.lstrip().startswith("{") \
            and args.train_quantizer not in QUANTIZER_KINDS:
        raise VistokError(f"--train-quantizer {args.train_quantizer!r} is neither a JSON config nor one of "
                          f"{', '.join(QUANTIZER_KINDS)}.")
    for model in list(args.models) + list(args.codec_models or []):
        parse_model(model)
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_arguments(args)
        plan = build_plan(args, device)
    except VistokError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if cuda:
        # The quantizers' float32 distances use TF32 tensor cores, as a training run would.
        torch.set_float32_matmul_precision("high")
    isolate = {"auto": not cuda, "yes": True, "no": False}[args.isolate]
    available = available_memory_bytes()
    memory_limit = int(args.max_memory_gb * 2**30) if args.max_memory_gb else (
        int(0.8 * available) if available else None)

    notes: list[str] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    threads = args.threads or torch.get_num_threads()
    if not cuda and threads > 1 and load > 0.5 * cores:
        # OpenMP regions wait for every thread: with another process on a core, each parallel op
        # can stall for a scheduler tick, which hurts code made of many small ops the most.
        notes.append(f"the machine is busy (load average {load:.1f} on {cores} cores): multi-threaded CPU timings "
                     "stall on descheduled threads and vary widely; --threads 1 gives stable comparisons")
        _log(f"note: {notes[-1]}")
    reference_version = quantizers.reference_version()
    if "quantizers" in args.sections and not args.no_reference and reference_version is None:
        notes.append(f"{REFERENCE_PACKAGE} is not installed, so only vistok's quantizers were measured; "
                     'install it with: pip install -e ".[bench]"')
        _log(f"note: {notes[-1]}")
        plan = [{**c, "reference": False} if c["section"] == "quantizer" else c for c in plan]

    meta = {
        "command": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"{_cpu_name()}, {os.cpu_count()} cores",
        "cpu_count": os.cpu_count(), "threads": threads, "load_average_at_start": load, "vistok": vistok_version(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "reference_version": reference_version,
        "timing": f"median of up to {args.repeats} timed steps after {args.warmup} warm-up "
                  f"({'+2 for compile; ' if cuda else ''}stopping after {args.budget:g} s)",
        "memory_method": ("torch.cuda.max_memory_allocated above the allocation before the case" if cuda else
                          "fresh child process per case: peak RSS (VmHWM) minus RSS before the case"
                          if isolate else "peak RSS minus RSS before the case, in one process (allocator "
                                          "caches from earlier cases can hide part of a peak)"),
        "isolated": isolate, "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": notes,
    }
    report: dict[str, Any] = {"meta": meta, "train": [], "codec": [], "quantizers": [], "data": None}

    def run(function: Callable[[dict[str, Any]], dict[str, Any]], case: dict[str, Any]) -> dict[str, Any]:
        # the data section starts DataLoader workers, which a (daemonic) isolated child may not
        if isolate and case["section"] != "data":
            return run_isolated(function, case, memory_limit)
        return run_case(function, case)

    started = time.perf_counter()
    reference_limit = torch.cuda.mem_get_info(device)[0] if cuda else None
    for index, case in enumerate(plan, 1):
        _log(f"[{index}/{len(plan)}] {case_label(case)} ...")
        if case["section"] == "quantizer":
            report["quantizers"].append(compare_quantizer(case, run, reference_limit or memory_limit, _log))
            continue
        result = run(CASE_FUNCTIONS[case["section"]], case)
        if "error" in result:
            _log(f"    {result['error']}")
        if case["section"] == "data":
            report["data"] = result
        else:
            report[case["section"]].append(result if "error" not in result else {**result, "case": case})
    report["targets"] = evaluate_targets(report)
    meta["elapsed_s"] = time.perf_counter() - started
    meta["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    atomic_write_text(args.output, json.dumps(report, indent=2, default=str) + "\n")
    print(format_report(report))
    print(f"\nwrote {args.output}")
    return 0
