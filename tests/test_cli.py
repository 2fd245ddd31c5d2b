"""The command line's skeleton: `vistok`, `python -m vistok`, and `vistok train` beside `python train.py`."""
from __future__ import annotations

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
        f"{entry}: error: unknown quantizer 'nope'; choose one of fsq, fsq_flextok, lfq, soft, vq, vq_titok, vq_vqgan (files in configs/quantizer/)."
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
