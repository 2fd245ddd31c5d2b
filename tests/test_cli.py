"""The command line's skeleton: `vistok`, `python -m vistok`, and `vistok train` beside `python train.py`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vistok.cli as vistok_cli

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vistok_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "shards", "export", "encode", "decode", "info", "score"):
        assert name in out


def test_no_command_prints_help(capsys):
    assert vistok_cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_module_entry_point_prints_the_version(tmp_path):
    result = _run([sys.executable, "-m", "vistok", "--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("vistok ")


@pytest.mark.parametrize("entry", ["vistok train", "train.py"])
def test_both_training_entry_points_refuse_bad_settings_alike(tmp_path, entry):
    """`vistok train` (from any folder) and the checkout's `python train.py` run the same checks."""
    command = [sys.executable, "-m", "vistok", "train"] if entry == "vistok train" else [sys.executable, str(ROOT / "train.py")]
    result = _run([*command, "quantizer=nope"], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{entry}: error: unknown quantizer 'nope'; choose one of fsq, fsq_flextok, gaussian, lfq, lfq_magvit2, soft, vq, vq_titok, vq_vqgan (files in configs/quantizer/)."
    ]


def test_train_py_does_not_put_the_checkout_on_the_import_path(tmp_path):
    """Run as a script, train.py drops its own folder from sys.path, so `import tokenizers` there can
    only find an installed package (Hugging Face's), never the checkout's tokenizers/ folder."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})  # where Python puts a script's own folder\n"
        f"sys.argv = [{str(ROOT / 'train.py')!r}, '--config-dir', '/nonexistent']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('root on path:', any(p and __import__('os').path.realpath(p) == {str(ROOT)!r} for p in sys.path))\n"
    )
    result = _run([sys.executable, str(probe)], ROOT)
    assert "root on path: False" in result.stdout, (result.stdout, result.stderr)
    assert "--config-dir /nonexistent is not a folder" in result.stderr


# ---- outputs that cannot be written --------------------------------------------------------

# A 16 px TiTok with a few thousand parameters: a checkpoint written without training, so the
# commands below run in a second each.
TINY = {
    "arch": "titok", "preset": "tiny", "image_size": 16, "num_tokens": 4, "patch_size": 8,
    "width": 16, "depth": 1, "heads": 2,
    "quantizer": {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [5, 5]},
}


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from vistok.tokenizers.export import TOKENIZER_PREFIX, add_prefix
    from vistok.tokenizers.model import build_tokenizer

    torch.manual_seed(0)
    state = add_prefix(build_tokenizer(**TINY).state_dict(), TOKENIZER_PREFIX)
    torch.save({"hyper_parameters": {"tokenizer": TINY}, "state_dict": state}, path)
    return path


def _images(folder: Path, n: int = 3) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if Path("/sys/kernel").is_dir():  # root writes through file modes; sysfs refuses new files even to root
        return Path("/sys/kernel")
    pytest.skip("running as root without sysfs: no read-only place to test")


@pytest.mark.parametrize("place", ["under a file", "read-only"])
def test_every_command_refuses_an_output_it_cannot_write_before_any_work(tmp_path, monkeypatch, capsys, place):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no metric weights: score skips rFID/LPIPS, fast
    ckpt = _tiny_checkpoint(tmp_path / "tiny.ckpt")
    images = _images(tmp_path / "images")
    tokens = tmp_path / "tokens.npz"
    assert vistok_cli.main(["encode", str(ckpt), str(images), "--out", str(tokens)]) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    parent = blocker if place == "under a file" else _read_only_folder(tmp_path)
    expected = f"is inside {blocker}, which is a file" if place == "under a file" else "cannot be written"
    commands = {
        "export": ["export", str(ckpt), str(parent / "out" / "export"), "--no-ema"],
        "encode": ["encode", str(ckpt), str(images), "--out", str(parent / "out" / "tokens.npz")],
        "decode": ["decode", str(ckpt), str(tokens), "--out", str(parent / "out" / "png")],
        "score": ["score", str(ckpt), str(images), "--out", str(parent / "out" / "score"), "--codecs", "none"],
        "shards": ["shards", str(images), str(parent / "out" / "shards"), "--workers", "0"],
    }
    capsys.readouterr()
    before = sorted(tmp_path.rglob("*"))
    for name, argv in commands.items():
        assert vistok_cli.main(argv) == 2, name
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vistok {name}: error: "), (name, captured.err)
        assert expected in lines[0] and "choose a" in lines[0], (name, lines[0])
        assert "scoring" not in captured.err and not captured.out, name  # refused before the work started
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even an empty folder


def test_score_creates_its_output_folder_before_scoring(tmp_path, monkeypatch):
    """The folder exists when the first batch is scored, not only after all of them."""
    import vistok.eval.score as score

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    out = tmp_path / "nested" / "score"
    seen = []
    real = score.rate_distortion

    def spy(*args, **kwargs):
        seen.append(out.is_dir())
        return real(*args, **kwargs)

    monkeypatch.setattr(score, "rate_distortion", spy)
    ckpt = _tiny_checkpoint(tmp_path / "tiny.ckpt")
    assert vistok_cli.main(["score", str(ckpt), str(_images(tmp_path / "images")), "--out", str(out), "--codecs", "none"]) == 0
    assert seen == [True] and (out / "report.json").is_file()
