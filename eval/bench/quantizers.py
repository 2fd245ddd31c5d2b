"""The ``quantizers`` section: vistok's quantizers next to vector-quantize-pytorch at equal settings.

Each quantizer runs forward + backward on fixed (B, N, D) latents with its losses on, as in
training. Peak memory is read per implementation (a fresh process each on CPU); the times come
from one process in which the implementations' steps alternate, so both see the same load.
For vistok's quantizers also the structural checks: host-synchronising ops in forward, and the
op count of forward + backward at 64 and 128 tokens (a Python loop over tokens would make it
grow; a loop over code chunks would not).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vistok.eval.bench.audit import OpAudit
from vistok.eval.bench.measure import PeakMemory, measure_interleaved
from vistok.tokenizers.errors import VistokError

QUANTIZER_KINDS = ("vq", "vq-ema", "fsq", "lfq", "softvq")
REFERENCE_PACKAGE = "vector-quantize-pytorch"


def reference_version() -> str | None:
    """The installed vector-quantize-pytorch version (the optional ``bench`` extra), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(REFERENCE_PACKAGE)
    except PackageNotFoundError:
        return None


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


def _quantize(module: torch.nn.Module, latents: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized, auxiliary loss) from either implementation's output."""
    out = module(latents)
    if impl == "vistok":
        return out.quantized, out.loss
    loss = out[2] if len(out) > 2 else latents.new_zeros(())
    return out[0], loss


def _quantizer_step(case: dict[str, Any], impl: str) -> tuple[torch.nn.Module, Callable[[], None], torch.Tensor]:
    """(module, one forward + backward on fixed (B, N, D) latents, the latents) for one implementation."""
    device = torch.device(case["device"])
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


def _count_step_ops(module: torch.nn.Module, impl: str, tokens: int, dim: int, device: torch.device) -> int:
    """aten ops dispatched by one forward + backward on (1, tokens, dim) latents."""
    latents = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    with OpAudit() as audit:
        quantized, loss = _quantize(module, latents, impl)
        (quantized.sum() + loss).backward()
    module.zero_grad(set_to_none=True)
    return audit.total


def bench_quantizer_memory(case: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one forward + backward of ``case["impl"]``, and vistok's structural checks."""
    device, impl = torch.device(case["device"]), case["impl"]
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        module, step, latents = _quantizer_step(case, impl)
        step()
    result = {"impl": impl, "shape": list(latents.shape), "peak_memory_bytes": memory.peak_bytes,
              "memory_method": memory.method}
    if impl == "vistok":
        with OpAudit() as audit:
            _quantize(module, latents, impl)
        result["forward_ops"] = audit.total
        result["forward_host_sync_ops"] = dict(audit.syncs)
        result["step_ops_at_64_and_128_tokens"] = [_count_step_ops(module, impl, n, latents.shape[-1], device)
                                                   for n in (64, 128)]
    return result


def bench_quantizer_timing(case: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward time of the implementations in ``case["impls"]``, their steps interleaved."""
    device = torch.device(case["device"])
    torch.manual_seed(0)
    steps = {impl: _quantizer_step(case, impl)[1] for impl in case["impls"]}
    runs = measure_interleaved(steps, device, warmup=case["warmup"], repeats=case["repeats"], budget_s=case["budget"])
    return {impl: {"step_s": run["median_s"], "best_s": run["best_s"], "times_s": run["times_s"],
                   "warmup_s": run["warmup_s"], "note": run.get("note")} for impl, run in runs.items()}


def compare_quantizer(case: dict[str, Any], run: Callable[[Callable, dict[str, Any]], dict[str, Any]],
                      memory_limit: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """One row of the quantizer table: vistok's quantizer and, if ``case["reference"]``, the reference.

    ``run(function, case)`` runs one measurement (in a fresh process on CPU). A reference case
    whose tokens x codes matrices would not fit in ``memory_limit`` bytes is skipped.
    """
    entry: dict[str, Any] = {"quantizer": case["kind"], "codebook_size": case["size"],
                             "tokens": math.prod(case["shape"])}
    impls = ["vistok"] + ([REFERENCE_PACKAGE] if case["reference"] else [])
    key = {"vistok": "vistok", REFERENCE_PACKAGE: "reference"}
    timed = []
    for impl in impls:
        if impl == REFERENCE_PACKAGE:
            need = reference_memory_estimate(case["kind"], case["size"], entry["tokens"])
            if memory_limit and need > memory_limit:
                entry[key[impl]] = {"error": f"skipped: needs about {need / 2**30:.0f} GiB (it materialises tokens x "
                                             f"codes), limit {memory_limit / 2**30:.0f} GiB"}
                log(f"  {impl}: {entry[key[impl]]['error']}")
                continue
        log(f"  {impl}: peak memory")
        entry[key[impl]] = run(bench_quantizer_memory, {**case, "impl": impl})
        if "error" in entry[key[impl]]:
            log(f"    {entry[key[impl]]['error']}")
        else:
            timed.append(impl)
    if timed:
        log(f"  time, interleaved: {', '.join(timed)}")
        timing = run(bench_quantizer_timing, {**case, "impls": timed})
        for impl in timed:
            entry[key[impl]].update(timing.get(impl, {"error": timing.get("error", "not timed")}))
        if "error" in timing:
            log(f"    {timing['error']}")
    ours, ref = entry.get("vistok", {}), entry.get("reference", {})
    if ours.get("step_s") and ref.get("step_s"):
        entry["speedup"] = ref["step_s"] / ours["step_s"]  # medians; > 1: vistok is faster
        entry["time_ratio"] = ours["step_s"] / ref["step_s"]
        entry["speedup_best"] = ref["best_s"] / ours["best_s"]  # fastest runs
    return entry
