"""Smoke tests of the benchmark (``python -m vistok.eval.bench``, ``python -m vistok.eval.bench.data``)
at the tiniest sizes.

They check that it runs and writes the JSON it promises; they never assert on time (the
machines are shared and noisy: speed is what the script reports, not what tests check).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vistok.eval.bench import cli, data, quantizers, targets
from vistok.eval.bench.measure import measure_interleaved

ROOT = Path(__file__).resolve().parents[1]

# Tiny everything: 16 px images, 2 images, 8-code codebooks, one timed step, no warm-up.
TINY = ["--batch", "2", "--image-size", "16", "--quantizer-shape", "2x8", "--vq-codes", "16", "--lfq-bits", "4",
        "--softvq-codes", "8", "--fsq-levels", "3,3", "--vq-dim", "4", "--warmup", "0", "--repeats", "1"]


def test_runs_in_process_and_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["--sections", "train,codec,quantizers,data", "--models", "titok:tiny,conv:tiny", "--isolate", "no",
                     "--no-reference", "--data-images", "6", "--data-workers", "0", "--data-batch", "2",
                     "--data-batches", "2", "--output", str(out), *TINY])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"meta", "train", "codec", "quantizers", "data", "targets"}
    assert report["meta"]["device"] == "cpu" and not report["meta"]["isolated"]

    train = {row["model"]: row for row in report["train"]}
    assert set(train) == {"titok:tiny", "conv:tiny"}, report["train"]
    for row in train.values():
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["flops_per_step"] > 0
        assert isinstance(row["peak_memory_bytes"], int)
        assert row["batch"] == 2 and row["image_size"] == 16 and row["precision"] == "fp32" and not row["compile"]
        assert row["host_sync_ops"] == {}, row["host_sync_ops"]  # the training step never waits on the host
        # nor does the LightningModule's training_step around it (NaN guard, EMA, logging)
        assert row["training_step_host_sync_ops"] == {} and row["training_step_audited_steps"] == 3, row
    assert any("scaled_dot_product" in op for op in train["titok:tiny"]["attention_ops"])

    codec = {row["model"]: row for row in report["codec"]}
    assert set(codec) == {"titok:tiny", "conv:tiny"}
    for row in codec.values():
        assert row["encode_images_per_s"] > 0 and row["decode_images_per_s"] > 0 and row["prefix_decodes_per_s"] > 0

    pairs = {p["quantizer"]: p for p in report["quantizers"]}
    assert set(pairs) == {"vq", "fsq", "lfq", "softvq"}
    assert pairs["fsq"]["codebook_size"] == 9 and pairs["lfq"]["codebook_size"] == 16
    for pair in pairs.values():
        assert pair["tokens"] == 16 and pair["vistok"]["step_s"] > 0 and "reference" not in pair
        assert pair["vistok"]["forward_host_sync_ops"] == {}

    loader = report["data"]
    assert loader["images_per_s"] > 0 and loader["imagefolder_images_per_s"] > 0, loader
    assert {row["reader"] for row in loader["rows"]} == {"shards", "ImageFolder"}
    assert all(row["scale"] == [0.8, 1.0] and len(row["runs"]) == 3 for row in loader["rows"])

    judged = {t["target"]: t for t in report["targets"]}
    assert all(set(t) == {"target", "measured", "met"} for t in judged.values())
    printed = capsys.readouterr().out
    assert "Training step" in printed and "Quantizer forward + backward" in printed and "Targets" in printed
    assert "Data loader" in printed


@pytest.mark.skipif(quantizers.reference_version() is None, reason="vector-quantize-pytorch (the bench extra) is not installed")
def test_compares_with_vector_quantize_pytorch(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["--sections", "quantizers", "--quantizers", "vq,fsq,lfq", "--isolate", "no",
                     "--output", str(out), *TINY]) == 0
    pairs = json.loads(out.read_text())["quantizers"]
    assert len(pairs) == 3
    for pair in pairs:
        assert pair["reference"]["step_s"] > 0, pair
        assert pair["reference"]["shape"] == pair["vistok"]["shape"]  # equal settings
        assert pair["speedup"] > 0 and pair["time_ratio"] == pytest.approx(1 / pair["speedup"])


def test_missing_reference_is_said_and_ours_still_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantizers, "reference_version", lambda: None)
    out = tmp_path / "bench.json"
    assert cli.main(["--sections", "quantizers", "--quantizers", "fsq", "--isolate", "no", "--output", str(out),
                     *TINY]) == 0
    report = json.loads(out.read_text())
    assert "vector-quantize-pytorch is not installed" in capsys.readouterr().err
    assert any("not installed" in note for note in report["meta"]["notes"])
    assert report["quantizers"][0]["vistok"]["step_s"] > 0 and "reference" not in report["quantizers"][0]


def test_script_isolates_cases_and_rejects_bad_input(tmp_path):
    """Via ``python -m``: on CPU each case runs in a fresh process whose peak RSS is read."""
    out = tmp_path / "sub" / "bench.json"
    done = subprocess.run([sys.executable, "-m", "vistok.eval.bench", "--sections", "quantizers", "--quantizers", "fsq",
                           "--no-reference", "--output", str(out), *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["isolated"] and "child process" in report["meta"]["memory_method"]
    row = report["quantizers"][0]["vistok"]
    assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] >= 0
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # atomic write left no temporary file

    bad = subprocess.run([sys.executable, "-m", "vistok.eval.bench", "--sections", "train,nope", "--output",
                          str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert "error: unknown section(s) nope" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.json").exists()


def test_targets_are_judged_from_the_measurements():
    def pair(kind, size, ours_s, ref_s, peak):
        return {"quantizer": kind, "codebook_size": size, "tokens": 8192, "speedup": ref_s / ours_s,
                "time_ratio": ours_s / ref_s, "vistok": {"step_s": ours_s, "peak_memory_bytes": peak,
                                                          "forward_host_sync_ops": {}},
                "reference": {"step_s": ref_s}}

    report = {"quantizers": [pair("fsq", 64000, 2.0, 1.0, 10), pair("lfq", 2**16, 1.0, 10.0, int(1.5e9)),
                             pair("lfq", 2**18, 1.0, 10.0, int(3e9))], "train": []}
    met = {t["target"]: t["met"] for t in targets.evaluate_targets(report)}
    assert met["every quantizer at least as fast as vector-quantize-pytorch (forward + backward)"] is False
    assert met["LFQ with entropy terms, 8192 tokens, 2^16 codes: peak memory < 2 GB"] is True
    assert met["LFQ with entropy terms, 8192 tokens, 2^18 codes: peak memory < 2 GB"] is False
    assert met["LFQ 2^16 at 8192 tokens: at most 1/4 of vector-quantize-pytorch's time"] is True
    assert met["MFU reported for the titok base preset on CUDA"] is None  # nothing measured on CUDA


def test_interleaved_timing_alternates_and_takes_a_slow_warmup_as_the_measurement():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    runs = measure_interleaved(steps, torch.device("cpu"), warmup=1, repeats=3, budget_s=60.0)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then alternating order
    assert all(len(r["times_s"]) == 3 and len(r["warmup_s"]) == 1 and "note" not in r for r in runs.values())

    calls.clear()
    steps["slow"] = lambda: (calls.append("slow"), time.sleep(0.2))
    runs = measure_interleaved(steps, torch.device("cpu"), warmup=2, repeats=2, budget_s=0.1)
    assert calls.count("slow") == 1  # its one warm-up call exceeded the budget: it is not called again
    assert runs["slow"]["times_s"] == runs["slow"]["warmup_s"] and "budget" in runs["slow"]["note"]
    assert len(runs["a"]["times_s"]) >= 1 and "note" not in runs["a"]

    assert measure_interleaved({"x": lambda: None}, torch.device("cpu"), warmup=1, repeats=0,
                               budget_s=1.0)["x"]["times_s"] == []  # repeats=0 only warms up


def test_data_benchmark_compares_both_readers_and_rejects_bad_input(tmp_path, capsys):
    """``python -m vistok.eval.bench.data`` with its own options (in process, at the tiniest sizes)."""
    out = tmp_path / "sub" / "data.json"
    assert data.main(["--images", "6", "--workers", "0", "--batch-size", "2", "--batches", "2", "--size", "16",
                      "--repeats", "2", "--scales", "0.5-1.0", "--sides", "40-60", "--dir", str(tmp_path),
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["scales"] == [[0.5, 1.0]] and result["settings"]["sides"] == [40, 60]
    assert [(row["reader"], row["scale"]) for row in result["rows"]] == [("ImageFolder", [0.5, 1.0]),
                                                                        ("shards", [0.5, 1.0])]
    for row in result["rows"]:
        assert len(row["runs"]) == 2 and all(run["images"] == 4 for run in row["runs"])
        assert row["images_per_s_median"] > 0 and row["cpu_ms_per_image_median"] > 0
    assert "ImageFolder" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # the images and shards were temporary
    assert [p.name for p in out.parent.iterdir()] == ["data.json"]

    assert data.main(["--scales", "0-1", "--out", str(tmp_path / "x.json")]) == 2
    assert "error: --scales 0-1 must be LOW-HIGH areas" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
