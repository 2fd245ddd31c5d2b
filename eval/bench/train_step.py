"""The ``train`` section: one training step (forward + backward + AdamW) of a tokenizer.

The loss is MSE + the quantizer's auxiliary loss (no LPIPS / discriminator: those belong to the
training recipe, not the model). Besides time and peak memory, one eager forward + backward is
recorded: its FLOPs (``torch.utils.flop_counter``), the attention kernels and matmul dtypes that
ran, and any op that makes the host wait. The same audit then covers the trainer's own step:
:func:`audit_training_step` runs ``TokenizerModule.training_step`` (loss terms, clipping, EMA,
the NaN/inf guard, logging) for a few steps under a Lightning Trainer.
"""
from __future__ import annotations

from collections.abc import Mapping
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
        trainer_precision = "bf16-mixed" if precision == "bf16" else "32-true"
        module_audit = audit_training_step(model.config, images, precision=trainer_precision)

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
        "training_step_host_sync_ops": dict(module_audit.syncs), "training_step_audited_steps": MODULE_AUDIT_STEPS,
        "note": timing.get("note"),
    }


# Steps of TokenizerModule.training_step audited per model: fewer than trainer.log_every_n_steps's
# default (50), so a check that runs at the logging interval is rightly not in the count.
MODULE_AUDIT_STEPS = 3


def audit_training_step(tokenizer: Mapping[str, Any], images: torch.Tensor, steps: int = MODULE_AUDIT_STEPS,
                        precision: str = "32-true", **settings: Any) -> OpAudit:
    """The aten ops of ``steps`` calls of ``TokenizerModule.training_step`` (the Lightning side of a step).

    tokenizer: ``build_tokenizer`` kwargs; images: (B, 3, H, W) in [0, 1], on the device to run on,
    the batch of every step; settings: the module's loss/optim/ema/validation blocks (train.yaml's
    defaults otherwise). Only what runs between a batch's start and end hooks is recorded (the
    step, backward and optimizer step included), not data loading or checkpointing.
    """
    import lightning.pytorch as pl

    from vistok.tokenizers.training.module import TokenizerModule

    audit = OpAudit()

    class Window(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            audit.__enter__()

        def on_train_batch_end(self, *args: Any) -> None:
            audit.__exit__(None, None, None)

    module = TokenizerModule(dict(tokenizer), **settings)
    loader = torch.utils.data.DataLoader([{"image": images.cpu()}] * steps, batch_size=None)
    trainer = pl.Trainer(accelerator=images.device.type, devices=1, precision=precision, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Window()])
    trainer.fit(module, train_dataloaders=loader)
    return audit
