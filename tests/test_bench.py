"""Smoke tests of the benchmark script (``python -m vistok.eval.bench``) at the tiniest sizes.

They check that it runs and writes the JSON it promises; they never assert on time (the
machines are shared and noisy: speed is what the script reports, not what tests check).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vistok.eval import bench

ROOT = Path(__file__).resolve().parents[1]

# Tiny everything: 16 px images, 2 images, 8-code codebooks, one timed step, no warm-up.
TINY = ["--batch", "2", "--image-size", "16", "--quantizer-shape", "2x8", "--vq-codes", "16", "--lfq-bits", "4",
        "--softvq-codes", "8", "--fsq-levels", "3,3", "--vq-dim", "4", "--warmup", "0", "--repeats", "1"]


def test_runs_in_process_and_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--sections", "train,codec,quantizers", "--models", "titok:tiny,conv:tiny", "--isolate", "no",
                       "--no-reference", "--output", str(out), *TINY])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"meta", "train", "codec", "quantizers", "targets"}
    assert report["meta"]["device"] == "cpu" and not report["meta"]["isolated"]

    train = {row["model"]: row for row in report["train"]}
    assert set(train) == {"titok:tiny", "conv:tiny"}, report["train"]
    for row in train.values():
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["flops_per_step"] > 0
        assert isinstance(row["peak_memory_bytes"], int)
        assert row["batch"] == 2 and row["image_size"] == 16 and row["precision"] == "fp32" and not row["compile"]
        assert row["host_sync_ops"] == {}, row["host_sync_ops"]  # the training step never waits on the host
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

    targets = {t["target"]: t for t in report["targets"]}
    assert all(set(t) == {"target", "measured", "met"} for t in targets.values())
    printed = capsys.readouterr().out
    assert "Training step" in printed and "Quantizer forward + backward" in printed and "Targets" in printed


@pytest.mark.skipif(bench._reference_version() is None, reason="vector-quantize-pytorch (the bench extra) is not installed")
def test_compares_with_vector_quantize_pytorch(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--sections", "quantizers", "--quantizers", "vq,fsq,lfq", "--isolate", "no",
                       "--output", str(out), *TINY]) == 0
    pairs = json.loads(out.read_text())["quantizers"]
    assert len(pairs) == 3
    for pair in pairs:
        assert pair["reference"]["step_s"] > 0, pair
        assert pair["reference"]["shape"] == pair["vistok"]["shape"]  # equal settings
        assert pair["speedup"] > 0 and pair["time_ratio"] == pytest.approx(1 / pair["speedup"])


def test_missing_reference_is_said_and_ours_still_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_reference_version", lambda: None)
    out = tmp_path / "bench.json"
    assert bench.main(["--sections", "quantizers", "--quantizers", "fsq", "--isolate", "no", "--output", str(out),
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
    met = {t["target"]: t["met"] for t in bench.evaluate_targets(report)}
    assert met["every quantizer at least as fast as vector-quantize-pytorch (forward + backward)"] is False
    assert met["LFQ with entropy terms, 8192 tokens, 2^16 codes: peak memory < 2 GB"] is True
    assert met["LFQ with entropy terms, 8192 tokens, 2^18 codes: peak memory < 2 GB"] is False
    assert met["LFQ 2^16 at 8192 tokens: at most 1/4 of vector-quantize-pytorch's time"] is True
    assert met["MFU reported for the titok base preset on CUDA"] is None  # nothing measured on CUDA
