"""The command line's skeleton and the guard against Hugging Face's ``tokenizers`` shadowing ours."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vistok_cli

ROOT = Path(__file__).resolve().parents[1]


def _fake_tokenizers(tmp_path: Path) -> Path:
    """A directory holding a package named ``tokenizers`` that is not ours (as HF's would be)."""
    fake = tmp_path / "site" / "tokenizers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('the shadowing package must never be imported')\n")
    return fake.parent


def _run(args: list[str], tmp_path: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
        # A script's own folder normally comes first on sys.path, which would hide the shadowing
        # for train.py; safe-path mode (as some sites set) leaves the order to PYTHONPATH.
        env["PYTHONSAFEPATH"] = "1"
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vistok_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("shards", "export", "encode", "decode", "info", "score"):
        assert name in out


def test_no_command_prints_help(capsys):
    assert vistok_cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_own_tokenizers_resolves_here():
    assert vistok_cli.tokenizers_shadow_message() is None


def test_console_script_runs(tmp_path):
    result = _run([sys.executable, "-m", "vistok_cli", "--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("vistok ")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python 3.11")
@pytest.mark.parametrize("entry", ["vistok", "train.py"])
def test_shadowed_tokenizers_exits_2_with_one_sentence(tmp_path, entry):
    site = _fake_tokenizers(tmp_path)
    if entry == "vistok":
        args = [sys.executable, "-m", "vistok_cli", "--help"]
    else:
        args = [sys.executable, str(ROOT / "train.py"), "--help"]
    result = _run(args, tmp_path, pythonpath=site)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(site / "tokenizers") in lines[0]
    assert "virtual environment" in lines[0]
    assert "shadowing package must never be imported" not in result.stderr
