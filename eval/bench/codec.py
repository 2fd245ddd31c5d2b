"""The ``codec`` section: ``encode`` and ``decode`` images/s, and decoding every prefix k = 1..K.

Prefixes are decoded as the rate-distortion evaluation decodes them
(:func:`vistok.eval.rate_distortion.decode_prefixes`: stacked, ``batch`` rows per call), in
inference mode, with autocast when asked.
"""
from __future__ import annotations

from typing import Any

import torch

from vistok.eval.bench.measure import PeakMemory, autocast, measure


def bench_codec(case: dict[str, Any]) -> dict[str, Any]:
    """encode / decode images/s and all-prefix decoding of one ``ARCH:PRESET`` at random weights."""
    from vistok.eval.rate_distortion import decode_prefixes
    from vistok.tokenizers.model import build_tokenizer

    device, precision = torch.device(case["device"]), case["precision"]
    arch, preset, batch, size = case["arch"], case["preset"], case["batch"], case["image_size"]
    timing = {"device": device, "warmup": case["warmup"], "repeats": case["repeats"], "budget_s": case["budget"]}
    torch.manual_seed(0)
    with PeakMemory(device) as memory, torch.inference_mode():
        model = build_tokenizer(arch=arch, preset=preset, image_size=size, quantizer=case.get("quantizer"))
        model = model.to(device).eval()
        images = torch.rand(batch, 3, size, size, device=device)
        with autocast(device, precision):
            tokens = model.encode(images)
            k_max = model.max_tokens
            prefix_batch = max(1, min(batch, case.get("prefix_batch") or batch))
            prefix_tokens = tokens[:prefix_batch]
            every_prefix = list(range(1, k_max + 1))
            timings = {
                "encode": measure(lambda: model.encode(images), **timing),
                "decode": measure(lambda: model.decode(tokens), **timing),
                "prefixes": measure(lambda: decode_prefixes(model, prefix_tokens, every_prefix, max_batch=batch),
                                    **{**timing, "warmup": min(case["warmup"], 1)}),
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
