"""The ``train`` section: one training step (forward + backward + AdamW) of a tokenizer.

The loss is MSE + the quantizer's auxiliary loss (no LPIPS / discriminator: those belong to the
training recipe, not the model). Besides time and peak memory, one eager forward + backward is
recorded: its FLOPs (``torch.utils.flop_counter``), the attention kernels and matmul dtypes that
ran, and any op that makes the host wait.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vistok.eval.bench.audit import OpAudit, cuda_sync_warnings
from vistok.eval.bench.flops import peak_tflops, utilisation
from vistok.eval.bench.measure import PeakMemory, autocast, measure


def bench_train(case: dict[str, Any]) -> dict[str, Any]:
    """One training step: forward (bf16 autocast when asked) + backward + AdamW, optionally compiled."""
    from vistok.tokenizers.model import build_tokenizer

    device, precision = torch.device(case["device"]), case["precision"]
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
            with autocast(device, precision):
                out = net(images)
                return F.mse_loss(out.reconstruction.float(), images) + out.quantizer.loss

        def step() -> None:
            loss_of(forward).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # FLOPs, kernels and host syncs of forward + backward are recorded in one eager step that
        # stands in for the last warm-up step (the compiled model does the same arithmetic).
        for _ in range(0 if case["compile"] else max(0, case["warmup"] - 1)):
            step()
        audit = OpAudit()
        flops = FlopCounterMode(display=False)
        with cuda_sync_warnings(device) as sync_warnings, flops, audit:
            loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # compiling happens in the first calls: two more warm-ups, none of which is the measurement
        timing = measure(step, device, warmup=case["warmup"] + 2 if case["compile"] else 0, repeats=case["repeats"],
                         budget_s=case["budget"], count_slow_warmup=not case["compile"])

    total_flops = flops.get_total_flops()
    step_s = timing["median_s"]
    peak, peak_source = peak_tflops(device, case.get("peak_tflops"))
    achieved_tflops, mfu = utilisation(total_flops, step_s, peak)
    return {
        "model": f"{arch}:{preset}", "arch": arch, "preset": preset, "params": params,
        "num_tokens": model.max_tokens, "batch": batch, "image_size": size, "device": device.type,
        "precision": precision, "compile": case["compile"],
        "step_s": step_s, "times_s": timing["times_s"], "warmup_s": timing["warmup_s"],
        "images_per_s": batch / step_s, "peak_memory_bytes": memory.peak_bytes, "memory_method": memory.method,
        "flops_per_step": total_flops, "achieved_tflops": achieved_tflops, "mfu": mfu, "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "attention_ops": sorted(op for op in audit.ops if "attention" in op),
        "matmul_dtypes": dict(audit.matmul_dtypes),
        "host_sync_ops": dict(audit.syncs), "cuda_sync_warnings": sync_warnings,
        "note": timing.get("note"),
    }
