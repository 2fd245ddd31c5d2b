"""The benchmark report as plain-text tables, one per section, then the targets and notes."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vistok.eval.bench.quantizers import REFERENCE_PACKAGE


def _fmt(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format(value * scale, spec)
    return str(value)


def _mib(value: Any) -> str:
    return _fmt(value, ".0f", 1 / 2**20) if isinstance(value, (int, float)) else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _error_row(row: dict[str, Any], columns: int) -> list[str]:
    case = row["case"]
    return [f"{case['arch']}:{case['preset']}", "error: " + row["error"][:80]] + [""] * (columns - 2)


def train_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["model", "Mparams", "K", "batch x px", "prec", "compile", "ms/step", "img/s", "peak MiB",
               "GFLOP/step", "TFLOP/s", "MFU"]
    cells = [_error_row(r, len(headers)) if "error" in r else
             [r["model"], _fmt(r["params"], ".1f", 1e-6), str(r["num_tokens"]), f"{r['batch']}x{r['image_size']}",
              r["precision"], "yes" if r["compile"] else "no", _fmt(r["step_s"], ".1f", 1e3),
              _fmt(r["images_per_s"], ".1f"), _mib(r["peak_memory_bytes"]), _fmt(r["flops_per_step"], ".1f", 1e-9),
              _fmt(r["achieved_tflops"], ".3g"), _fmt(r["mfu"], ".1%")] for r in rows]
    return "Training step (forward + backward + AdamW)\n" + table(headers, cells)


def codec_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["model", "K", "batch x px", "encode img/s", "decode img/s", "prefix decodes/s", "s/img all K prefixes"]
    cells = [_error_row(r, len(headers)) if "error" in r else
             [r["model"], str(r["num_tokens"]), f"{r['batch']}x{r['image_size']}",
              _fmt(r["encode_images_per_s"], ".1f"), _fmt(r["decode_images_per_s"], ".1f"),
              _fmt(r["prefix_decodes_per_s"], ".1f"), _fmt(r["all_prefixes_s_per_image"], ".3f")] for r in rows]
    return "Encode / decode (inference)\n" + table(headers, cells)


def quantizer_table(pairs: Sequence[dict[str, Any]], reference_version: str | None) -> str:
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
    return (f"Quantizer forward + backward: vistok vs {REFERENCE_PACKAGE} ({reference_version or 'not installed'}); "
            "speedup = reference time / vistok time, of medians and of best runs\n"
            + table(["quantizer", "codes", "tokens", "ms", "peak MiB", "ref ms", "ref peak MiB", "speedup", "best"],
                    rows))


def data_table(data: dict[str, Any]) -> str:
    if "error" in data:
        return "Data loader\nerror: " + data["error"]
    d = data["settings"]
    return (f"Data loader (vistok.eval.bench.data: {d['workers']} workers, batch {d['batch_size']}, random resized "
            f"crops to {d['image_size']} px from ~400 px JPEGs; medians of {d['repeats']} runs)\n"
            + table(["reader", "img/s (whole run)", "img/s (after first batch)"],
                    [["vistok shards", _fmt(data["images_per_s"], ".1f"), _fmt(data["steady_images_per_s"], ".1f")],
                     ["torchvision ImageFolder", _fmt(data["imagefolder_images_per_s"], ".1f"),
                      _fmt(data["imagefolder_steady_images_per_s"], ".1f")]]))


def format_report(report: dict[str, Any]) -> str:
    """The human-readable tables of a report (the JSON ``main`` writes)."""
    meta = report["meta"]
    parts = [f"vistok benchmark on {meta['device_name']} (torch {meta['torch']}, {meta['threads']} threads); "
             "medians of repeated runs"]
    if report.get("train"):
        parts.append(train_table(report["train"]))
    if report.get("codec"):
        parts.append(codec_table(report["codec"]))
    if report.get("quantizers"):
        parts.append(quantizer_table(report["quantizers"], meta.get("reference_version")))
    if report.get("data"):
        parts.append(data_table(report["data"]))
    if report.get("targets"):
        mark = {True: "met", False: "MISSED", None: "n/a"}
        parts.append("Targets (issue 8)\n" + "\n".join(f"  [{mark[t['met']]}] {t['target']}: {t['measured']}"
                                                     for t in report["targets"]))
    if meta.get("notes"):
        parts.append("Notes\n" + "\n".join(f"  - {n}" for n in meta["notes"]))
    return "\n\n".join(parts)
