"""vistok as users install it: one package named `vistok`, beside Hugging Face's `tokenizers` and `transformers`.

Two install modes are checked:

- editable: the virtual environment these tests run in (`pip install -e ".[dev]"`, which brings
  `transformers` along);
- regular: a wheel built from this checkout, installed with `--no-deps` into a fresh virtual
  environment that sees the test environment's packages (torch, transformers, ...) through a `.pth`
  line, so nothing is downloaded and vistok itself comes only from the wheel.

In both, a script that imports `transformers`, `tokenizers` and `vistok` together runs from another
folder and from the checkout's root, `vistok --help` works and `vistok train` trains two steps from a
folder that has no configs, with a user's own experiment file from `--config-dir`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600

# What a user's script does with both libraries installed.
PROBE = """
import importlib.util
import transformers, tokenizers
from transformers import PreTrainedTokenizerFast
from vistok import load
import vistok
print("tokenizers", tokenizers.__file__)
print("vistok", vistok.__file__)
print("load", load.__module__)
print("others", [name for name in ("data", "eval") if importlib.util.find_spec(name) is not None])
"""

# A user's own experiment, kept outside the package and found through --config-dir.
USER_EXPERIMENT = """# @package _global_
defaults:
  - override /quantizer: lfq
name: my_run
quantizer:
  dim: 6
"""

TWO_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "model.width=16",
             "model.heads=2", "data.batch_size=4", "data.crops_per_photo=2", "data.val_crops_per_photo=1",
             "logger=none", "validation.grid_images=0"]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _probe(python: str, cwd: Path, script_dir: Path) -> dict[str, str]:
    """Run PROBE as a script file (``python probe.py``) with ``cwd`` as the working directory.

    A script's own folder, not the working directory, goes first on sys.path; only an interactive
    interpreter or ``python -c`` started in the checkout's root sees its tokenizers/ folder (README).
    """
    script = script_dir / "probe.py"
    script.write_text(PROBE)
    return _probe_lines(_run([python, str(script)], cwd).stdout)


def _is_under(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def hf():
    """Hugging Face's tokenizers and transformers, as the dev extra installs them."""
    pytest.importorskip("transformers", reason="the dev extra (pip install -e '.[dev]') brings transformers")
    import tokenizers

    return Path(tokenizers.__file__).resolve().parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of this checkout with the test environment's setuptools (no download).

    A copy, because setuptools builds in the source tree and keeps a build/ folder there whose stale
    files would end up in later wheels.
    """
    source, out = tmp_path_factory.mktemp("source") / "vistok", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "multirun", "wandb", "runs"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)], out)
    (built,) = out.glob("vistok-*.whl")
    return built


@pytest.fixture(scope="module")
def regular_venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with vistok installed from the wheel (not editable)."""
    venv = tmp_path_factory.mktemp("regular") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], venv.parent)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv.parent).stdout.strip())
    # The test environment's packages (torch, transformers, ...) after the new environment's own; a
    # plain path line, so the editable install's finder there is not activated.
    (site / "zz_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], venv.parent)
    return venv


@pytest.fixture(scope="module")
def user_configs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("my-configs")
    (folder / "experiment").mkdir()
    (folder / "experiment" / "my_run.yaml").write_text(USER_EXPERIMENT)
    return folder


def _train_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VISTOK_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "offline"}


def test_wheel_installs_only_the_vistok_package_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"vistok", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for module in ("vistok/__init__.py", "vistok/cli.py", "vistok/train.py", "vistok/tokenizers/model.py",
                   "vistok/tokenizers/training/run.py", "vistok/data/datamodule.py", "vistok/eval/metrics.py"):
        assert module in names
    configs = {name for name in names if name.startswith("vistok/configs/")}
    shipped = {f"vistok/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs == shipped
    assert not any(name.startswith(("vistok/tests/", "vistok/slurm/", "vistok/.")) for name in names)
    # every module of the checkout's packages is in the wheel (no subpackage left out of pyproject.toml)
    for folder in ("tokenizers", "data", "eval"):
        for path in (ROOT / folder).rglob("*.py"):
            assert f"vistok/{path.relative_to(ROOT).as_posix()}" in names, path


@pytest.mark.parametrize("where", ["elsewhere", "checkout root"])
def test_editable_install_lives_beside_transformers(hf, tmp_path, where):
    cwd = ROOT if where == "checkout root" else tmp_path
    found = _probe(sys.executable, cwd, tmp_path)
    assert _is_under(found["tokenizers"], hf), found  # Hugging Face's, not the checkout's tokenizers/
    assert Path(found["vistok"]).resolve() == ROOT / "__init__.py"
    assert found["load"] == "vistok.tokenizers.export"
    assert found["others"] == "[]"  # the checkout's data/ and eval/ are not importable as top-level names


@pytest.mark.parametrize("where", ["elsewhere", "checkout root"])
def test_regular_install_lives_beside_transformers(hf, regular_venv, tmp_path, where):
    cwd = ROOT if where == "checkout root" else tmp_path
    found = _probe(str(regular_venv / "bin" / "python"), cwd, tmp_path)
    assert _is_under(found["tokenizers"], hf), found
    assert _is_under(found["vistok"], regular_venv), found  # the wheel's copy, not the checkout
    assert found["load"] == "vistok.tokenizers.export"
    assert found["others"] == "[]"


def test_pytest_sees_hugging_face_tokenizers(hf):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    assert PreTrainedTokenizerFast.__module__.startswith("transformers.")

    assert _is_under(tokenizers.__file__, hf)


@pytest.mark.parametrize("entry", ["vistok", "python -m vistok", "train.py"])
def test_transformers_imports_inside_the_entry_points(hf, tmp_path, entry):
    """After vistok's entry points have set up the process, `import transformers` still works there,
    started from the checkout's root (where `python -m` and a script in that folder put it on sys.path)."""
    if entry == "vistok":  # the console script: its own folder (the venv's bin/) comes first
        setup, run = "", f"runpy.run_path({shutil.which('vistok')!r}, run_name='__main__')"
        argv = ["vistok", "--version"]
    elif entry == "python -m vistok":
        setup, run = f"sys.path.insert(0, {str(ROOT)!r})", "runpy.run_module('vistok', run_name='__main__')"
        argv = ["vistok", "--version"]
    else:
        setup, run = f"sys.path.insert(0, {str(ROOT)!r})", f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')"
        argv = [str(ROOT / "train.py"), "--config-dir", str(tmp_path / "missing")]
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import runpy, sys\n{setup}\nsys.argv = {argv!r}\n"
        f"try:\n    {run}\nexcept SystemExit:\n    pass\n"
        "import tokenizers\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "print('tokenizers', tokenizers.__file__)\n"
    )
    found = _probe_lines(_run([sys.executable, str(probe)], ROOT).stdout)
    assert _is_under(found["tokenizers"], hf), found


def _probe_lines(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("tokenizers ", "vistok ", "load ", "others ")))


@pytest.mark.parametrize("mode", ["editable", "regular"])
def test_vistok_train_runs_from_any_folder_with_user_configs(mode, request, tmp_path, user_configs):
    if mode == "regular":
        vistok = str(request.getfixturevalue("regular_venv") / "bin" / "vistok")
    else:
        vistok = shutil.which("vistok")
    env = _train_env(tmp_path)
    assert "train" in _run([vistok, "--help"], tmp_path, env).stdout
    # The packaged demo, from a folder with no configs in it.
    _run([vistok, "train", "experiment=demo", *TWO_STEPS, "run_dir=runs/demo"], tmp_path, env)
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt").is_file()
    assert "val/psnr" in (tmp_path / "runs" / "demo" / "metrics.json").read_text()
    # A user's own experiment file, found through --config-dir, on top of the packaged groups.
    result = _run([vistok, "train", "--config-dir", str(user_configs), "experiment=my_run", *TWO_STEPS,
                   "run_dir=runs/mine"], tmp_path, env)
    assert "codebook usage" in result.stdout
    config = (tmp_path / "runs" / "mine" / "config.yaml").read_text()
    assert "vistok.tokenizers.quantizers.LFQ" in config and "name: my_run" in config
