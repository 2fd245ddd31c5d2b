"""The closing ``Targets`` block: the performance targets of issue 8, judged from the measurements.

Each target is ``{"target", "measured", "met"}`` with ``met`` True, False or None (not measured,
or measured at settings other than the target's).
"""
from __future__ import annotations

import json
from typing import Any

from vistok.eval.bench.quantizers import REFERENCE_PACKAGE


def _quantizer_pair(pairs: list[dict[str, Any]], kind: str, size: int) -> dict[str, Any]:
    return next((p for p in pairs if p["quantizer"] == kind and p["codebook_size"] == size), {})


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets from a report's ``quantizers`` and ``train`` rows."""
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
        lfq = _quantizer_pair(pairs, "lfq", 2**bits)
        peak = lfq.get("vistok", {}).get("peak_memory_bytes")
        tokens = lfq.get("tokens")
        targets.append({
            "target": f"LFQ with entropy terms, 8192 tokens, 2^{bits} codes: peak memory < 2 GB",
            "measured": f"{peak / 1e9:.3f} GB at {tokens} tokens" if peak is not None else "not measured",
            "met": (peak < 2e9) if (peak is not None and tokens == 8192) else None,
        })
    lfq16 = _quantizer_pair(pairs, "lfq", 2**16)
    ratio = lfq16.get("time_ratio")
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
    # the trainer's side of the step too (TokenizerModule.training_step: loss terms, EMA, the NaN guard)
    syncs.update({f"{r['model']} training_step": r.get("training_step_host_sync_ops") for r in train})
    quantizer_syncs = {f"{p['quantizer']}@{p['codebook_size']}": p["vistok"]["forward_host_sync_ops"]
                       for p in pairs if p.get("vistok", {}).get("forward_host_sync_ops")}
    bad = {k: v for k, v in {**syncs, **quantizer_syncs}.items() if v}
    targets.append({
        "target": "no host-device sync in the training step's forward + backward, nor in the LightningModule's "
                  "training_step (aten op audit; CUDA sync debug mode on GPU)",
        "measured": (json.dumps(bad) if bad else f"none in {len(train)} model steps, {len(train)} training_step audits and "
                                                   f"{sum(1 for p in pairs if 'vistok' in p)} quantizer forwards"),
        "met": (not bad) if (syncs or pairs) else None,
    })
    return targets
