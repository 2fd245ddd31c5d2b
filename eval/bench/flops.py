"""Model FLOPs utilisation: FLOPs counted per step, over time, over the device's peak."""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (SXM parts; NVIDIA datasheets). Matched by substring of
# torch.cuda.get_device_name(), in this order (so "H100 PCIe" before "H100"); anything else
# needs --peak-tflops for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


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


def utilisation(flops: int, seconds: float, peak: float | None) -> tuple[float | None, float | None]:
    """(achieved TFLOP/s, MFU as a fraction of ``peak`` TFLOP/s); None where not measurable."""
    achieved = flops / seconds if seconds > 0 and flops else None
    mfu = achieved / (peak * 1e12) if achieved and peak else None
    return (achieved / 1e12 if achieved else None), mfu
