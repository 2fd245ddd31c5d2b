"""Speed and memory benchmark: ``python -m vistok.eval.bench``.

Measures, side by side in one run:

* ``train``: one training step (forward + backward + AdamW step) of the 1D (``titok``) and 2D
  (``conv``) tokenizers at a stated batch and resolution: images/s, peak memory, FLOPs per step
  (``torch.utils.flop_counter``), achieved FLOP/s and model FLOPs utilisation (MFU) where the
  device's peak is known, which attention kernel and matmul dtypes ran, and whether anything
  in forward + backward waits on the host. The loss is MSE + the quantizer's auxiliary loss
  (no LPIPS / discriminator: those belong to the training recipe, not the model). On CUDA:
  bf16 autocast, with and without ``torch.compile``.
* ``codec``: ``encode`` and ``decode`` images/s, and decoding every prefix k = 1..K of each
  image, as the rate-distortion evaluation does.
* ``quantizers``: forward + backward time and peak memory of each quantizer at a stated token
  count and codebook size, next to ``vector-quantize-pytorch``'s equivalent at equal settings
  (same tokens, codebook, dims, losses on), and the ratio. Optional: ``pip install -e ".[bench]"``.
  The two are timed in one process with their steps interleaved, so both see the same load.
* ``data``: the data loader's images/s, through :mod:`vistok.data.bench`.

Timing: each case runs ``--warmup`` untimed steps (for training, the last of them records FLOPs,
kernels and host syncs; compiled models get two more), then up to ``--repeats`` timed steps
(fewer when ``--budget`` seconds are used up); the median is reported. A warm-up step slower
than the budget counts as the measurement. On CUDA the device is synchronised around each
timed step.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
case. On CPU each case runs in a fresh child process (forked from a clean server process that
has imported torch), and the peak is the child's peak resident set (``VmHWM``, reset at the
start) minus its resident set before the case builds anything. Both include the case's own
weights, optimizer state, inputs and activations.

Results: a table on stdout and JSON written atomically to ``--output``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vistok.tokenizers.atomic import atomic_write_text
from vistok.tokenizers.errors import VistokError

# Dense bf16 tensor-core peaks, TFLOP/s (SXM parts; NVIDIA datasheets). Matched by substring of
# torch.cuda.get_device_name(); anything else needs --peak-tflops for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}

# aten ops that make the host wait for the device (a scalar read back, or an output whose shape
# depends on data). Seen in forward + backward of a training step, they stall the CUDA stream.
HOST_SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "equal", "is_nonzero", "repeat_interleave",
}
# Ops that sync only on an accelerator (bincount reads its maximum back on CUDA); code may use
# them on CPU tensors and something else on CUDA, so they count only off the CPU.
DEVICE_SYNC_OPS = {"bincount", "histc"}
# Ops whose input dtype says at which precision the bulk of the FLOPs ran.
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "linear", "matmul"}

DEFAULT_MODELS = ("titok:tiny", "titok:small", "titok:base", "conv:tiny", "conv:f8", "conv:f16")
QUANTIZER_KINDS = ("vq", "vq-ema", "fsq", "lfq", "softvq")
REFERENCE_PACKAGE = "vector-quantize-pytorch"


# --------------------------------------------------------------------------- measurement helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, budget_s: float,
            count_slow_warmup: bool = True) -> dict[str, Any]:
    """Time ``step``: ``warmup`` untimed calls, then up to ``repeats`` timed ones within ``budget_s``.

    Returns {"median_s", "best_s", "times_s", "warmup_s"}. When ``count_slow_warmup`` and one
    warm-up call alone exceeds the budget, that call is the measurement (with a "note"; large
    reference cases take tens of seconds per call on a CPU). ``repeats=0`` only warms up.
    """
    warmup_times: list[float] = []
    for _ in range(warmup):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        warmup_times.append(time.perf_counter() - start)
        if count_slow_warmup and warmup_times[-1] > budget_s:
            return {"median_s": warmup_times[-1], "best_s": warmup_times[-1], "times_s": warmup_times[-1:],
                    "warmup_s": warmup_times,
                    "note": "one call exceeded the time budget; it is the measurement"}
    if repeats == 0:
        last = warmup_times[-1:] or [float("nan")]
        return {"median_s": last[0], "best_s": last[0], "times_s": [], "warmup_s": warmup_times}
    times: list[float] = []
    began = time.perf_counter()
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() - began > budget_s:
            break
    return {"median_s": statistics.median(times), "best_s": min(times), "times_s": times, "warmup_s": warmup_times}


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block above the level before it; see the module docstring for the method.

    On CPU the process-wide peak RSS is reset through ``/proc/self/clear_refs`` (Linux >= 4.0),
    so the figure is only clean in a fresh process (``run_isolated``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the allocation before the case"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self._base = (_proc_status_kib("VmRSS") or 0) * 1024
                self._hwm = True
                self.method = "peak RSS (VmHWM, reset at the case start) minus RSS before the case"
            except OSError:
                import resource

                self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self._hwm = False
                self.method = "ru_maxrss growth during the case (lower bound: the peak could not be reset)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm:
            self.peak_bytes = (_proc_status_kib("VmHWM") or 0) * 1024 - self._base
        else:
            import resource

            self.peak_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


class OpAudit(TorchDispatchMode):
    """Records the aten ops a block dispatches: counts, host-synchronising ops, matmul dtypes.

    Boolean-mask indexing (``x[mask]``) is counted as a sync: its output shape depends on data.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.matmul_dtypes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in HOST_SYNC_OPS or (name in DEVICE_SYNC_OPS and args[0].device.type != "cpu"):
            self.syncs[name] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                     for i in (args[1] if len(args) > 1 and args[1] is not None else ())):
            self.syncs["index(bool mask)"] += 1
        if name in MATMUL_OPS and args and isinstance(args[0], torch.Tensor):
            # addmm's first argument is the bias; the second is a matmul operand
            operand = args[1] if name in ("addmm", "baddbmm") and len(args) > 1 else args[0]
            self.matmul_dtypes[str(operand.dtype).replace("torch.", "")] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device):
    """On CUDA, count synchronising CUDA calls with ``torch.cuda.set_sync_debug_mode("warn")``."""
    record: list[str] = []
    if device.type != "cuda":
        yield record
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield record
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    record.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from) for MFU."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value, f"table ({key} bf16 dense)"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    return None, "CPU: pass --peak-tflops for MFU"


# --------------------------------------------------------------------------- quantizer configs
def _parse_model(text: str) -> tuple[str, str]:
    arch, _, preset = text.partition(":")
    if not preset:
        raise VistokError(f"model {text!r} is not ARCH:PRESET; write e.g. titok:base or conv:f8.")
    return arch, preset


def quantizer_config(kind: str, size: int, dim: int, levels: Sequence[int]) -> dict[str, Any]:
    """vistok's quantizer config for one benchmark case (losses on, as in training)."""
    if kind == "vq":
        return {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": dim, "codebook_size": size,
                "commitment_weight": 0.25}
    if kind == "vq-ema":
        return {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": dim, "codebook_size": size,
                "ema": True, "decay": 0.99, "commitment_weight": 0.25}
    if kind == "fsq":
        return {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": list(levels)}
    if kind == "lfq":
        return {"_target_": "vistok.tokenizers.quantizers.LFQ", "dim": int(math.log2(size)), "entropy_weight": 0.1,
                "commitment_weight": 0.25}
    if kind == "softvq":
        return {"_target_": "vistok.tokenizers.quantizers.SoftVQ", "dim": dim, "codebook_size": size}
    raise VistokError(f"unknown quantizer {kind!r}; use some of {', '.join(QUANTIZER_KINDS)}.")


def reference_quantizer(kind: str, size: int, dim: int, levels: Sequence[int]) -> torch.nn.Module | None:
    """vector-quantize-pytorch's module at the settings of ``quantizer_config`` (None: no equivalent).

    VQ: learned codebook (no EMA, no k-means init), plain straight-through (rotation trick off),
    commitment 0.25 — vistok's default VectorQuantizer. VQ-EMA: EMA decay 0.99, no k-means init,
    straight-through. FSQ: the same levels. LFQ: dim = bits, entropy loss weight 0.1 with
    diversity gamma 1, commitment 0.25 (its default soft-assignment temperature 1/100 = ours).
    """
    import vector_quantize_pytorch as vqp

    if kind == "vq":
        return vqp.VectorQuantize(dim=dim, codebook_size=size, kmeans_init=False, ema_update=False,
                                  learnable_codebook=True, rotation_trick=False, commitment_weight=0.25)
    if kind == "vq-ema":
        return vqp.VectorQuantize(dim=dim, codebook_size=size, kmeans_init=False, decay=0.99,
                                  rotation_trick=False, commitment_weight=0.25)
    if kind == "fsq":
        return vqp.FSQ(levels=list(levels))
    if kind == "lfq":
        return vqp.LFQ(dim=int(math.log2(size)), codebook_size=size, entropy_loss_weight=0.1,
                       commitment_loss_weight=0.25, diversity_gamma=1.0)
    return None


def reference_memory_estimate(kind: str, size: int, tokens: int) -> int:
    """Bytes vector-quantize-pytorch needs: it materialises tokens x codes float32 matrices.

    Calibrated on its 1.32 LFQ (about 7 live tokens x codes matrices in forward + backward: 15 GB
    at 8192 tokens x 2^16 codes) and VectorQuantize (distances, one-hot and their gradients).
    """
    factor = {"lfq": 7.5, "vq": 4.0, "vq-ema": 4.0}.get(kind, 0.0)
    return int(factor * tokens * size * 4)


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- cases
def _device(name: str) -> torch.device:
    return torch.device(name)


def bench_train(case: dict[str, Any]) -> dict[str, Any]:
    """One training step of a tokenizer: forward (bf16 autocast on CUDA) + backward + AdamW."""
    from vistok.tokenizers.model import build_tokenizer

    device, precision = _device(case["device"]), case["precision"]
    arch, preset = case["arch"], case["preset"]
    batch, size = case["batch"], case["image_size"]
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        kwargs: dict[str, Any] = {"quantizer": case.get("quantizer")}
        if arch == "titok" and case.get("token_dropout", True):
            kwargs["token_dropout"] = {"p": 1.0, "distribution": "uniform"}
        model = build_tokenizer(arch=arch, preset=preset, image_size=size, **kwargs).to(device).train()
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4,
                                      fused=device.type == "cuda")
        images = torch.rand(batch, 3, size, size, device=device)
        forward = torch.compile(model) if case["compile"] else model

        def loss_of(net: torch.nn.Module) -> torch.Tensor:
            with _autocast(device, precision):
                out = net(images)
                return F.mse_loss(out.reconstruction.float(), images) + out.quantizer.loss

        def step() -> None:
            loss_of(forward).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # FLOPs, kernels and host syncs of forward + backward are recorded in one eager step that
        # stands in for the last warm-up step (the compiled model does the same arithmetic).
        plain_warmup = max(0, case["warmup"] - 1)
        for _ in range(0 if case["compile"] else plain_warmup):
            step()
        audit = OpAudit()
        flops = FlopCounterMode(display=False)
        with cuda_sync_warnings(device) as sync_warnings, flops, audit:
            loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timing = measure(step, device, warmup=case["warmup"] + 2 if case["compile"] else 0, repeats=case["repeats"],
                         budget_s=case["budget"], count_slow_warmup=not case["compile"])

    total_flops = flops.get_total_flops()
    step_s = timing["median_s"]
    achieved = total_flops / step_s if step_s > 0 else None
    peak, peak_source = peak_tflops(device, case.get("peak_tflops"))
    return {
        "model": f"{arch}:{preset}", "arch": arch, "preset": preset, "params": params,
        "num_tokens": model.max_tokens, "batch": batch, "image_size": size, "device": device.type,
        "precision": precision, "compile": case["compile"],
        "step_s": step_s, "times_s": timing["times_s"], "warmup_s": timing["warmup_s"],
        "images_per_s": batch / step_s, "peak_memory_bytes": memory.peak_bytes, "memory_method": memory.method,
        "flops_per_step": total_flops, "achieved_tflops": achieved / 1e12 if achieved else None,
        "mfu": (achieved / (peak * 1e12)) if (achieved and peak) else None, "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "attention_ops": sorted(op for op in audit.ops if "attention" in op),
        "matmul_dtypes": dict(audit.matmul_dtypes),
        "host_sync_ops": dict(audit.syncs), "cuda_sync_warnings": sync_warnings,
        "note": timing.get("note"),
    }


def bench_codec(case: dict[str, Any]) -> dict[str, Any]:
    """encode / decode images/s and all-prefix decoding (inference mode, autocast on CUDA)."""
    from vistok.eval.rate_distortion import decode_prefixes
    from vistok.tokenizers.model import build_tokenizer

    device, precision = _device(case["device"]), case["precision"]
    arch, preset, batch, size = case["arch"], case["preset"], case["batch"], case["image_size"]
    torch.manual_seed(0)
    with PeakMemory(device) as memory, torch.inference_mode():
        model = build_tokenizer(arch=arch, preset=preset, image_size=size, quantizer=case.get("quantizer"))
        model = model.to(device).eval()
        images = torch.rand(batch, 3, size, size, device=device)
        with _autocast(device, precision):
            tokens = model.encode(images)
            k_max = model.max_tokens
            prefix_batch = max(1, min(batch, case.get("prefix_batch") or batch))
            prefix_tokens = tokens[:prefix_batch]
            every_prefix = list(range(1, k_max + 1))
            timings = {
                "encode": measure(lambda: model.encode(images), device, warmup=case["warmup"],
                                  repeats=case["repeats"], budget_s=case["budget"]),
                "decode": measure(lambda: model.decode(tokens), device, warmup=case["warmup"],
                                  repeats=case["repeats"], budget_s=case["budget"]),
                # as the rate-distortion evaluation decodes them: stacked, ``batch`` rows per call
                "prefixes": measure(lambda: decode_prefixes(model, prefix_tokens, every_prefix, max_batch=batch),
                                    device, warmup=min(case["warmup"], 1),
                                    repeats=case["repeats"], budget_s=case["budget"]),
            }
    prefix_s = timings["prefixes"]["median_s"]
    return {
        "model": f"{arch}:{preset}", "num_tokens": k_max, "batch": batch, "image_size": size,
        "device": device.type, "precision": precision,
        "encode_images_per_s": batch / timings["encode"]["median_s"],
        "decode_images_per_s": batch / timings["decode"]["median_s"],
        "prefix_batch": prefix_batch,
        "prefix_decodes_per_s": prefix_batch * k_max / prefix_s,
        "all_prefixes_s_per_image": prefix_s / prefix_batch,
        "times_s": {name: t["times_s"] for name, t in timings.items()},
        "peak_memory_bytes": memory.peak_bytes, "memory_method": memory.method,
    }


def _quantizer_step(case: dict[str, Any], impl: str) -> tuple[torch.nn.Module, Callable[[], None], torch.Tensor]:
    """(module, one forward + backward on fixed (B, N, D) latents, the latents) for one implementation."""
    device = _device(case["device"])
    kind, size, levels = case["kind"], case["size"], case["levels"]
    if impl == "vistok":
        from vistok.tokenizers.quantizers import build_quantizer

        module = build_quantizer(quantizer_config(kind, size, case["dim"], levels))
    else:
        module = reference_quantizer(kind, size, case["dim"], levels)
    module = module.to(device).train()
    batch, length = case["shape"]
    dim = int(module.dim)
    latents = torch.randn(batch, length, dim, device=device, requires_grad=True)
    grad = torch.randn(batch, length, dim, device=device)

    def step() -> None:
        quantized, loss = _quantize(module, latents, impl)
        ((quantized * grad).sum() + loss).backward()
        latents.grad = None
        module.zero_grad(set_to_none=True)

    return module, step, latents


def bench_quantizer_memory(case: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one forward + backward of one implementation (a fresh process on CPU).

    For vistok's quantizers also the structural checks: host-synchronising ops in forward, and
    the op count of forward + backward at 64 and 128 tokens (a Python loop over tokens would make
    it grow; a loop over code chunks would not).
    """
    device, impl = _device(case["device"]), case["impl"]
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        module, step, latents = _quantizer_step(case, impl)
        step()
    result = {"impl": impl, "shape": list(latents.shape), "peak_memory_bytes": memory.peak_bytes,
              "memory_method": memory.method}
    if impl == "vistok":
        audit = OpAudit()
        with audit:
            _quantize(module, latents, impl)
        result["forward_ops"] = sum(audit.ops.values())
        result["forward_host_sync_ops"] = dict(audit.syncs)
        result["step_ops_at_64_and_128_tokens"] = [_count_step_ops(module, impl, n, latents.shape[-1], device)
                                                   for n in (64, 128)]
    return result


def bench_quantizer_timing(case: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward time of the implementations in ``case["impls"]``, interleaved.

    All are built in one process and their timed steps alternate (in alternating order), so
    each sees the same machine load: on a shared machine load changes over seconds, and timing
    one implementation after the other would compare different loads.
    """
    device = _device(case["device"])
    torch.manual_seed(0)
    steps = {impl: _quantizer_step(case, impl)[1] for impl in case["impls"]}
    runs = {impl: measure(step, device, warmup=case["warmup"], repeats=0, budget_s=case["budget"])
            for impl, step in steps.items()}
    # an implementation whose warm-up alone exceeded the budget is measured by it
    active = [impl for impl in steps if not runs[impl].get("note")]
    times: dict[str, list[float]] = {impl: [] for impl in active}
    began = time.perf_counter()
    for repeat in range(case["repeats"]):
        for impl in (active if repeat % 2 == 0 else active[::-1]):
            _sync(device)
            start = time.perf_counter()
            steps[impl]()
            _sync(device)
            times[impl].append(time.perf_counter() - start)
        if time.perf_counter() - began > case["budget"]:
            break
    result = {}
    for impl in steps:
        if times.get(impl):
            runs[impl] = {"median_s": statistics.median(times[impl]), "best_s": min(times[impl]),
                          "times_s": times[impl], "warmup_s": runs[impl]["warmup_s"]}
        result[impl] = {"step_s": runs[impl]["median_s"], "best_s": runs[impl]["best_s"],
                        "times_s": runs[impl]["times_s"], "warmup_s": runs[impl]["warmup_s"],
                        "note": runs[impl].get("note")}
    return result


def _count_step_ops(module: torch.nn.Module, impl: str, tokens: int, dim: int, device: torch.device) -> int:
    """aten ops dispatched by one forward + backward on (1, tokens, dim) latents."""
    latents = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    audit = OpAudit()
    with audit:
        quantized, loss = _quantize(module, latents, impl)
        (quantized.sum() + loss).backward()
    module.zero_grad(set_to_none=True)
    return sum(audit.ops.values())


def _quantize(module: torch.nn.Module, latents: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized, auxiliary loss) from either implementation's output."""
    if impl == "vistok":
        out = module(latents)
        return out.quantized, out.loss
    out = module(latents)
    quantized = out[0]
    loss = out[2] if len(out) > 2 else latents.new_zeros(())
    return quantized, loss


def bench_data(case: dict[str, Any]) -> dict[str, Any]:
    """The training stream's images/s, measured by the data developer's :mod:`vistok.data.bench`.

    It makes JPEGs from the bundled photographs, writes them as shards and as an ImageFolder
    tree, and times vistok's shard loader next to torchvision's ImageFolder loader (random
    resized crops at the benchmark's resolution). Its own printout goes to stderr.
    """
    from vistok.data import bench as data_bench

    settings = case["settings"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        result = data_bench.main([
            "--images", str(settings["images"]), "--workers", str(settings["workers"]),
            "--batch-size", str(settings["batch_size"]), "--batches", str(settings["batches"]),
            "--size", str(settings["image_size"]), "--repeats", str(settings["repeats"]),
            "--scales", "0.8-1.0", "--out", str(Path(tmp) / "data_bench.json"),
        ])
    rows = {row["reader"]: row for row in result["rows"]}
    shards, folder = rows.get("shards", {}), rows.get("ImageFolder", {})
    return {
        "images_per_s": shards.get("images_per_s_median"),
        "steady_images_per_s": shards.get("steady_images_per_s_median"),
        "imagefolder_images_per_s": folder.get("images_per_s_median"),
        "imagefolder_steady_images_per_s": folder.get("steady_images_per_s_median"),
        "settings": settings, "rows": result["rows"], "machine": result.get("machine"),
    }


CASE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": bench_train, "codec": bench_codec, "quantizer_memory": bench_quantizer_memory,
    "quantizer_timing": bench_quantizer_timing, "data": bench_data,
}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process; failures become ``{"error": ...}`` rows, not crashes."""
    try:
        if case.get("threads"):
            torch.set_num_threads(case["threads"])
        return CASE_FUNCTIONS[case["section"]](case)
    except torch.cuda.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception as error:  # a benchmark row that failed must not lose the others
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _child(case: dict[str, Any], connection) -> None:
    connection.send(run_case(case))
    connection.close()


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _forkserver() -> multiprocessing.context.BaseContext:
    # A clean server process imports torch and the model code once; each case is forked from it,
    # so children start fast, have run no OpenMP region (fork-safe) and own a fresh heap.
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # (not vistok.eval.bench itself: the child re-runs the main module by name, which runpy warns
        # about when that module is already imported)
        _CONTEXT.set_forkserver_preload(["torch", "timm", "vistok.tokenizers.model", "vistok.tokenizers.quantizers"])
    return _CONTEXT


def run_isolated(case: dict[str, Any], memory_limit_bytes: int | None) -> dict[str, Any]:
    """Run a case in a fresh child process; kill it when its RSS passes ``memory_limit_bytes``.

    The machine is shared, so a case that would exhaust memory is stopped rather than left to
    the kernel's OOM killer.
    """
    from vistok.eval import bench as module  # by its import name: under ``-m`` this file is __main__

    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=module._child, args=(case, send), daemon=True)
    process.start()
    send.close()
    killed_for_memory = threading.Event()

    def watch() -> None:
        path = f"/proc/{process.pid}/status"
        while process.is_alive():
            try:
                with open(path) as f:
                    rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            except OSError:
                return
            if memory_limit_bytes and rss > memory_limit_bytes:
                killed_for_memory.set()
                process.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result: dict[str, Any] | None = None
    try:
        result = receive.recv()
    except EOFError:
        pass
    process.join()
    watcher.join(timeout=1)
    if result is None:
        if killed_for_memory.is_set():
            return {"error": f"stopped: resident memory passed the {memory_limit_bytes / 2**30:.1f} GiB limit "
                             "(--max-memory-gb)"}
        return {"error": f"child process died (exit code {process.exitcode}; killed for memory?)"}
    return result


# --------------------------------------------------------------------------- plan
def build_plan(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The list of cases the arguments ask for, in run order."""
    cuda = device.type == "cuda"
    common = {"device": str(device), "warmup": args.warmup, "repeats": args.repeats, "budget": args.budget,
              "threads": args.threads}
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    compile_modes = {"auto": [False, True] if cuda else [False], "off": [False], "on": [True],
                     "both": [False, True]}[args.compile]
    train_quantizer = _parse_quantizer_arg(args.train_quantizer)
    cases: list[dict[str, Any]] = []
    if "train" in args.sections:
        for model in args.models:
            arch, preset = _parse_model(model)
            for compiled in compile_modes:
                cases.append({**common, "section": "train", "arch": arch, "preset": preset, "batch": args.batch,
                              "image_size": args.image_size, "precision": precision, "compile": compiled,
                              "quantizer": train_quantizer, "peak_tflops": args.peak_tflops})
    if "codec" in args.sections:
        for model in args.codec_models or args.models:
            arch, preset = _parse_model(model)
            cases.append({**common, "section": "codec", "arch": arch, "preset": preset, "batch": args.batch,
                          "image_size": args.image_size, "precision": precision, "quantizer": train_quantizer,
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


def _parse_quantizer_arg(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    if text.lstrip().startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise VistokError(f"--train-quantizer is not valid JSON ({error}); pass a JSON object or a name.") from None
        return config
    return quantizer_config(text, {"vq": 4096, "vq-ema": 4096, "lfq": 2**14, "softvq": 4096}.get(text, 0), 12,
                            [8, 8, 8, 5, 5, 5])


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format(value * scale, spec)
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _mib(value: Any) -> str:
    return _fmt(value, ".0f", 1 / 2**20) if isinstance(value, (int, float)) else "-"


def compare_quantizer(case: dict[str, Any], run: Callable[[dict[str, Any]], dict[str, Any]],
                      memory_limit: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """One row of the quantizer table: vistok's quantizer and, if asked, the reference.

    Peak memory is measured per implementation (``run`` gives each a fresh process on CPU); the
    times come from one process in which the implementations' steps alternate. A reference
    case whose tokens x codes matrices would not fit in ``memory_limit`` is skipped.
    """
    entry: dict[str, Any] = {"quantizer": case["kind"], "codebook_size": case["size"],
                             "tokens": math.prod(case["shape"])}
    impls = ["vistok"] + ([REFERENCE_PACKAGE] if case["reference"] else [])
    timed = []
    for impl in impls:
        key = "vistok" if impl == "vistok" else "reference"
        if impl == REFERENCE_PACKAGE:
            need = reference_memory_estimate(case["kind"], case["size"], entry["tokens"])
            if memory_limit and need > memory_limit:
                entry[key] = {"error": f"skipped: needs about {need / 2**30:.0f} GiB (it materialises tokens x "
                                       f"codes), limit {memory_limit / 2**30:.0f} GiB"}
                log(f"  {impl}: {entry[key]['error']}")
                continue
        log(f"  {impl}: peak memory")
        entry[key] = run({**case, "section": "quantizer_memory", "impl": impl})
        if "error" in entry[key]:
            log(f"    {entry[key]['error']}")
        else:
            timed.append(impl)
    if timed:
        log(f"  time, interleaved: {', '.join(timed)}")
        timing = run({**case, "section": "quantizer_timing", "impls": timed})
        for impl in timed:
            key = "vistok" if impl == "vistok" else "reference"
            entry[key].update(timing.get(impl, {"error": timing.get("error", "not timed")}))
        if "error" in timing:
            log(f"    {timing['error']}")
    ours, ref = entry.get("vistok", {}), entry.get("reference", {})
    if ours.get("step_s") and ref.get("step_s"):
        entry["speedup"] = ref["step_s"] / ours["step_s"]  # medians; > 1: vistok is faster
        entry["time_ratio"] = ours["step_s"] / ref["step_s"]
        entry["speedup_best"] = ref["best_s"] / ours["best_s"]  # fastest runs
    return entry


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets, each with the measured figure and met: True / False / None (not measured)."""
    targets: list[dict[str, Any]] = []
    pairs = report.get("quantizers", [])
    compared = [p for p in pairs if "speedup" in p]
    slower = [p for p in compared if p["speedup"] < 1.0]
    targets.append({
        "target": f"every quantizer at least as fast as {REFERENCE_PACKAGE} (forward + backward)",
        "measured": ", ".join(f"{p['quantizer']}@{p['codebook_size']}: {p['speedup']:.2f}x" for p in compared) or "not measured",
        "met": (not slower) if compared else None,
    })
    for bits in (16, 18):
        lfq = next((p for p in pairs if p["quantizer"] == "lfq" and p["codebook_size"] == 2**bits), None)
        peak = (lfq or {}).get("vistok", {}).get("peak_memory_bytes")
        tokens = (lfq or {}).get("tokens")
        targets.append({
            "target": f"LFQ with entropy terms, 8192 tokens, 2^{bits} codes: peak memory < 2 GB",
            "measured": f"{peak / 1e9:.3f} GB at {tokens} tokens" if peak is not None else "not measured",
            "met": (peak < 2e9) if (peak is not None and tokens == 8192) else None,
        })
    lfq16 = next((p for p in pairs if p["quantizer"] == "lfq" and p["codebook_size"] == 2**16), None)
    ratio = (lfq16 or {}).get("time_ratio")
    targets.append({
        "target": f"LFQ 2^16 at 8192 tokens: at most 1/4 of {REFERENCE_PACKAGE}'s time",
        "measured": f"{ratio:.4f} of its time" if ratio is not None else "not measured",
        "met": (ratio <= 0.25) if (ratio is not None and lfq16["tokens"] == 8192) else None,
    })
    loops = {f"{p['quantizer']}@{p['codebook_size']}": p["vistok"]["step_ops_at_64_and_128_tokens"]
             for p in pairs if "step_ops_at_64_and_128_tokens" in p.get("vistok", {})}
    growing = {k: v for k, v in loops.items() if v[0] != v[1]}
    targets.append({
        "target": "no Python loop over tokens in quantizer forward + backward (aten op count equal at 64 and 128 tokens)",
        "measured": (json.dumps(growing) if growing else f"equal for all {len(loops)} quantizers") if loops
        else "not measured",
        "met": (not growing) if loops else None,
    })
    train = [r for r in report.get("train", []) if "error" not in r]
    titok_cuda = [r for r in train if r["arch"] == "titok" and r["device"] == "cuda"]
    uses_sdpa = [r for r in train if r["arch"] == "titok" and any("scaled_dot_product" in op for op in r["attention_ops"])]
    targets.append({
        "target": "1D tokenizer: fused attention (scaled_dot_product_attention) and bf16 on CUDA",
        "measured": "; ".join(f"{r['model']} {r['device']}: {', '.join(r['attention_ops']) or 'no SDPA'}, "
                              f"matmuls {r['matmul_dtypes']}" for r in (titok_cuda or uses_sdpa)[:3]) or "not measured",
        "met": (all(any("scaled_dot_product" in op for op in r["attention_ops"])
                    and r["matmul_dtypes"].get("bfloat16", 0) >= sum(r["matmul_dtypes"].values()) / 2
                    for r in titok_cuda) if titok_cuda else None),
    })
    base = [r for r in titok_cuda if r["preset"] == "base"]
    targets.append({
        "target": "MFU reported for the titok base preset on CUDA",
        "measured": "; ".join(f"compile={r['compile']}: MFU {r['mfu']:.1%}" if r["mfu"] is not None else
                              f"compile={r['compile']}: {r['peak_tflops_source']}" for r in base) or "no CUDA device",
        "met": (all(r["mfu"] is not None for r in base) if base else None),
    })
    syncs = {r["model"]: r["host_sync_ops"] or (len(r["cuda_sync_warnings"]) or None) for r in train}
    quantizer_syncs = {f"{p['quantizer']}@{p['codebook_size']}": p["vistok"]["forward_host_sync_ops"]
                       for p in pairs if p.get("vistok", {}).get("forward_host_sync_ops")}
    bad = {k: v for k, v in {**syncs, **quantizer_syncs}.items() if v}
    targets.append({
        "target": "no host-device sync in the training step's forward + backward (aten op audit; CUDA sync debug mode on GPU)",
        "measured": (json.dumps(bad) if bad else f"none in {len(syncs)} training steps and "
                                                   f"{sum(1 for p in pairs if 'vistok' in p)} quantizer forwards"),
        "met": (not bad) if (syncs or pairs) else None,
    })
    return targets


def format_report(report: dict[str, Any]) -> str:
    """The human-readable tables."""
    parts = [(f"vistok benchmark on {report['meta']['device_name']} (torch {report['meta']['torch']}, "
              f"{report['meta']['threads']} threads); medians of repeated runs")]
    train = report.get("train", [])
    if train:
        rows = []
        for r in train:
            if "error" in r:
                rows.append([r["case"]["arch"] + ":" + r["case"]["preset"], "error: " + r["error"][:80]] + [""] * 10)
                continue
            rows.append([r["model"], _fmt(r["params"], ".1f", 1e-6), str(r["num_tokens"]), f"{r['batch']}x{r['image_size']}",
                         r["precision"], "yes" if r["compile"] else "no", _fmt(r["step_s"], ".1f", 1e3),
                         _fmt(r["images_per_s"], ".1f"), _mib(r["peak_memory_bytes"]),
                         _fmt(r["flops_per_step"], ".1f", 1e-9), _fmt(r["achieved_tflops"], ".3g"),
                         _fmt(r["mfu"], ".1%")])
        parts.append("Training step (forward + backward + AdamW)\n" + _table(
            ["model", "Mparams", "K", "batch x px", "prec", "compile", "ms/step", "img/s", "peak MiB", "GFLOP/step",
             "TFLOP/s", "MFU"], rows))
    codec = report.get("codec", [])
    if codec:
        rows = []
        for r in codec:
            if "error" in r:
                rows.append([r["case"]["arch"] + ":" + r["case"]["preset"], "error: " + r["error"][:80]] + [""] * 5)
                continue
            rows.append([r["model"], str(r["num_tokens"]), f"{r['batch']}x{r['image_size']}",
                         _fmt(r["encode_images_per_s"], ".1f"), _fmt(r["decode_images_per_s"], ".1f"),
                         _fmt(r["prefix_decodes_per_s"], ".1f"), _fmt(r["all_prefixes_s_per_image"], ".3f")])
        parts.append("Encode / decode (inference)\n" + _table(
            ["model", "K", "batch x px", "encode img/s", "decode img/s", "prefix decodes/s", "s/img all K prefixes"], rows))
    pairs = report.get("quantizers", [])
    if pairs:
        rows = []
        for p in pairs:
            ours, ref = p.get("vistok", {}), p.get("reference")
            ref_time = _fmt(ref.get("step_s"), ".1f", 1e3) if ref and "error" not in ref else (
                "n/a" if ref is None else ref["error"].split(" (")[0][:40])
            rows.append([p["quantizer"], str(p["codebook_size"]), str(p["tokens"]),
                         _fmt(ours.get("step_s"), ".1f", 1e3) if "error" not in ours else ours["error"][:60],
                         _mib(ours.get("peak_memory_bytes")), ref_time,
                         _mib(ref.get("peak_memory_bytes")) if ref else "-", _fmt(p.get("speedup"), ".2f"),
                         _fmt(p.get("speedup_best"), ".2f")])
        parts.append(f"Quantizer forward + backward: vistok vs {REFERENCE_PACKAGE} "
                     f"({report['meta'].get('reference_version') or 'not installed'}); speedup = reference time / "
                     "vistok time, of medians and of best runs\n" + _table(
                         ["quantizer", "codes", "tokens", "ms", "peak MiB", "ref ms", "ref peak MiB", "speedup",
                          "best"], rows))
    data = report.get("data")
    if data:
        if "error" in data:
            parts.append("Data loader\nerror: " + data["error"])
        else:
            d = data["settings"]
            parts.append(f"Data loader (vistok.data.bench: {d['workers']} workers, batch {d['batch_size']}, random resized "
                         f"crops to {d['image_size']} px from ~400 px JPEGs; medians of {d['repeats']} runs)\n" + _table(
                             ["reader", "img/s (whole run)", "img/s (after first batch)"],
                             [["vistok shards", _fmt(data["images_per_s"], ".1f"), _fmt(data["steady_images_per_s"], ".1f")],
                              ["torchvision ImageFolder", _fmt(data["imagefolder_images_per_s"], ".1f"),
                               _fmt(data["imagefolder_steady_images_per_s"], ".1f")]]))
    targets = report.get("targets", [])
    if targets:
        mark = {True: "met", False: "MISSED", None: "n/a"}
        parts.append("Targets (issue 8)\n" + "\n".join(f"  [{mark[t['met']]}] {t['target']}: {t['measured']}"
                                                     for t in targets))
    if report["meta"].get("notes"):
        parts.append("Notes\n" + "\n".join(f"  - {n}" for n in report["meta"]["notes"]))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- command line
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
        prog="python -m vistok.eval.bench", description=__doc__.split("\n\n")[0],
        epilog="Defaults depend on the device: a CPU run is sized to finish in minutes on a laptop-class machine; "
               "on CUDA batch 32 at 256 px.")
    parser.add_argument("--sections", type=_csv(str), default=["train", "codec", "quantizers", "data"],
                        help="comma list of train, codec, quantizers, data (default: all)")
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
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise VistokError(f"unknown --device {args.device!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VistokError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise VistokError(f"--device {args.device!r} is not supported; use cpu or cuda.")
    cuda = device.type == "cuda"
    defaults = {"batch": 32 if cuda else 2, "image_size": 256 if cuda else 64, "prefix_batch": 4 if cuda else 1,
                "warmup": 3 if cuda else 1, "data_images": 400 if cuda else 128,
                "data_batches": 40 if cuda else 10, "repeats": 20 if cuda else 3, "budget": 20.0 if cuda else 10.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.codec_models is None and not cuda:
        args.codec_models = [m for m in args.models if m.endswith(":tiny")] or args.models[:1]
    unknown = sorted(set(args.sections) - {"train", "codec", "quantizers", "data"})
    if unknown:
        raise VistokError(f"unknown section(s) {', '.join(unknown)}; use train, codec, quantizers, data.")
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
        _parse_model(model)
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


def _reference_version() -> str | None:
    try:
        from importlib.metadata import version

        return version(REFERENCE_PACKAGE)
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_arguments(args)
        plan = build_plan(args, device)
    except VistokError as error:
        print(f"python -m vistok.eval.bench: error: {error}", file=sys.stderr)
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
        print(f"note: {notes[-1]}", file=sys.stderr)
    reference_version = _reference_version()
    if "quantizers" in args.sections and not args.no_reference and reference_version is None:
        notes.append(f"{REFERENCE_PACKAGE} is not installed, so only vistok's quantizers were measured; "
                     'install it with: pip install -e ".[bench]"')
        print(f"note: {notes[-1]}", file=sys.stderr)
        plan = [{**c, "reference": False} if c["section"] == "quantizer" else c for c in plan]
    if "data" in args.sections:
        try:
            from vistok.data import bench as _data_bench  # noqa: F401
        except ImportError as error:
            notes.append(f"data loader section skipped: vistok.data.bench is not importable ({error})")
            plan = [c for c in plan if c["section"] != "data"]

    device_name = torch.cuda.get_device_name(device) if cuda else f"{_cpu_name()}, {os.cpu_count()} cores"
    meta = {
        "command": "python -m vistok.eval.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device), "device_name": device_name, "cpu_count": os.cpu_count(),
        "threads": threads, "load_average_at_start": load, "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(), "reference_version": reference_version,
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

    def run(case: dict[str, Any]) -> dict[str, Any]:
        # the data section starts DataLoader workers, which a (daemonic) isolated child may not
        return run_isolated(case, memory_limit) if isolate and case["section"] != "data" else run_case(case)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    reference_limit = None if not cuda else torch.cuda.mem_get_info(device)[0]
    for index, case in enumerate(plan, 1):
        log(f"[{index}/{len(plan)}] {_case_label(case)} ...")
        if case["section"] == "quantizer":
            report["quantizers"].append(compare_quantizer(case, run, reference_limit or memory_limit, log))
            continue
        result = run(case)
        if "error" in result:
            log(f"    {result['error']}")
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


def _case_label(case: dict[str, Any]) -> str:
    if case["section"] in ("train", "codec"):
        extra = " compiled" if case.get("compile") else ""
        return f"{case['section']} {case['arch']}:{case['preset']}{extra}"
    if case["section"] == "quantizer":
        return f"quantizer {case['kind']} at {case['size']} codes"
    return case["section"]


if __name__ == "__main__":
    sys.exit(main())
