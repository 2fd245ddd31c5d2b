"""Training: Lightning module, Hydra configs, train.py, checkpoints, resume, NaN stop, DDP.

Every run here is tiny (16 px images, a one-block TiTok of width 16, a few steps) on the
embedded sample data built once per session at 16 px with few crops, CPU only.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from vistok.tokenizers.training.callbacks import AtomicCheckpointIO
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.model import build_tokenizer
from vistok.tokenizers.training.module import TrainingDiverged
from vistok.tokenizers.training.run import list_checkpoints, resolve_resume, run_training
from vistok.tokenizers.training.settings import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.image_size=16", "model.patch_size=4", "model.num_tokens=8", "model.width=16",
              "model.depth=1", "model.heads=2"]
SMALL_CODEBOOKS = {
    "fsq": ["quantizer.levels=[5,3,3]"],
    "vq": ["quantizer.dim=4", "quantizer.codebook_size=32"],
    "lfq": ["quantizer.dim=5"],
    "soft": ["quantizer.dim=4", "quantizer.codebook_size=32"],
    "gaussian": ["quantizer.dim=4"],
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The embedded sample at 16 px with few crops, shared by every run of the session."""
    return tmp_path_factory.mktemp("sample-data")


def data_overrides(data_dir: Path) -> list[str]:
    return [f"data.data_dir={data_dir}", "data.batch_size=8", "data.num_workers=0", "data.crops_per_photo=4",
            "data.val_crops_per_photo=4", "data.shuffle_buffer=0", "data.batches_per_epoch=50"]


def tiny_overrides(data_dir: Path, steps: int = 4, val_every: int = 2) -> list[str]:
    return [*TINY_MODEL, *data_overrides(data_dir), f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={val_every}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "optim.warmup_steps=2",
            "optim.lr=1e-3", "validation.grid_images=2"]


def make_cfg(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


class Recorder(pl.Callback):
    """Keeps what a test wants to see of a run: the step it starts at, optimizer state at a step."""

    def __init__(self, capture_at: int | None = None, crash_at: int | None = None, poison_at: int | None = None):
        self.capture_at, self.crash_at, self.poison_at = capture_at, crash_at, poison_at
        self.start_step: int | None = None
        self.start_optimizer: dict | None = None
        self.captured: dict | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.start_optimizer = _clone(trainer.optimizers[0].state_dict())
        self.start_ema = _clone(pl_module.ema.module.state_dict())
        self.start_quantizer = _clone(pl_module.tokenizer.quantizer.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.capture_at:
            self.captured = _clone(trainer.optimizers[0].state_dict())
        if trainer.global_step == self.poison_at:
            with torch.no_grad():
                next(pl_module.tokenizer.decoder.parameters()).fill_(float("nan"))
        if trainer.global_step == self.crash_at:
            raise RuntimeError("simulated crash")


def _clone(state):
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for index, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name])), (index, name)


def run_with(cfg, run_dir: Path, *callbacks: pl.Callback):
    """run_training with extra callbacks appended (tests observe or interrupt the run)."""
    from vistok.tokenizers.training import run as training

    original = training.build_callbacks

    def patched(*args, **kwargs):
        built, artifacts = original(*args, **kwargs)
        return built + list(callbacks), artifacts

    training.build_callbacks = patched
    try:
        return run_training(cfg, run_dir)
    finally:
        training.build_callbacks = original


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsq_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsq-run")
    cfg = make_cfg(*tiny_overrides(data_dir), "quantizer=fsq", *SMALL_CODEBOOKS["fsq"])
    return run_training(cfg, run_dir)


@pytest.mark.parametrize("quantizer", ["vq", "lfq", "soft", "gaussian"])
def test_few_step_fit_for_each_quantizer(quantizer, data_dir, tmp_path):
    cfg = make_cfg(*tiny_overrides(data_dir, steps=3, val_every=3), f"quantizer={quantizer}", *SMALL_CODEBOOKS[quantizer])
    result = run_training(cfg, tmp_path)
    assert result.step == 3
    assert math.isfinite(result.metrics["val/psnr"]) and result.metrics["val/images"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if quantizer in ("soft", "gaussian"):
        assert "val/usage" not in result.metrics  # continuous tokens have no codebook indices
    else:
        assert 0 < result.metrics["val/usage"] <= 1


def test_fsq_fit_writes_run_directory(fsq_run):
    run_dir = fsq_run.run_dir
    assert fsq_run.step == 4 and fsq_run.token_counts == [1, 2, 4, 8]
    for k in fsq_run.token_counts:
        assert math.isfinite(fsq_run.metrics[f"val/psnr@{k}"]) and 0 <= fsq_run.metrics[f"val/ssim@{k}"] <= 1
    config = (run_dir / "config.yaml").read_text()
    assert "${" not in config and f"run_dir: {run_dir}" in config  # resolved
    assert (run_dir / "logs" / "version_0" / "metrics.csv").read_text().count("val/psnr") >= 1
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 4
    assert fsq_run.grid is not None and fsq_run.grid.is_file() and fsq_run.grid.parent == run_dir / "grids"
    with Image.open(fsq_run.grid) as grid:  # labelled rows (original + one per token count), crops enlarged
        assert grid.height >= 5 * 128 and grid.width > 2 * 128 + 60
    assert fsq_run.checkpoint is not None and fsq_run.checkpoint.name.startswith("best-")
    table = fsq_run.table
    assert "thumbnail" in table and str(fsq_run.checkpoint) in table and str(fsq_run.grid) in table


def test_checkpoint_has_contract_keys_and_loads_weights_only(fsq_run):
    ckpt = torch.load(fsq_run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    config = ckpt["hyper_parameters"]["tokenizer"]
    assert type(config) is dict and config["quantizer"]["_target_"] == "vistok.tokenizers.quantizers.FSQ"
    tokenizer = build_tokenizer(**config)
    raw = {k[len("tokenizer."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("tokenizer.")}
    assert raw.keys() == tokenizer.state_dict().keys()
    assert ckpt["ema_state_dict"].keys() == tokenizer.state_dict().keys()
    assert not any(k.startswith(("ema.", "perceptual.")) for k in ckpt["state_dict"])
    tokenizer.load_state_dict(ckpt["ema_state_dict"])
    assert not all(torch.equal(raw[k], ckpt["ema_state_dict"][k]) for k in raw)  # EMA is its own copy
    record = ckpt["vistok"]
    assert record["step"] == 4 and isinstance(record["version"], str)
    assert math.isfinite(record["metrics"]["val/psnr"]) and all(type(v) is float for v in record["metrics"].values())


def test_resume_continues_at_the_right_step_with_the_same_optimizer_state(data_dir, tmp_path):
    overrides = [*tiny_overrides(data_dir, steps=6, val_every=3), "quantizer=vq", "quantizer.dim=4",
                 "quantizer.codebook_size=32", "quantizer.ema=true", "quantizer.dead_code_steps=2"]
    first = Recorder(capture_at=3, crash_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_with(make_cfg(*overrides), tmp_path, first)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["vistok"]["step"] == 3

    # a fresh run into a directory with checkpoints is refused; resume=auto continues
    with pytest.raises(VistokError, match="resume=auto"):
        run_training(make_cfg(*overrides), tmp_path)
    second = Recorder()
    result = run_with(make_cfg(*overrides, "resume=auto"), tmp_path, second)
    assert second.start_step == 3 and result.step == 6
    assert_same_optimizer_state(second.start_optimizer, first.captured)
    assert saved["lr_schedulers"][0]["last_epoch"] == 3
    assert all(torch.equal(second.start_ema[k], v) for k, v in saved["ema_state_dict"].items())
    quantizer = {k[len("tokenizer.quantizer."):]: v for k, v in saved["state_dict"].items() if k.startswith("tokenizer.quantizer.")}
    assert {"codebook", "cluster_size", "embed_sum", "steps_unused"} <= quantizer.keys()
    assert all(torch.equal(second.start_quantizer[k], v) for k, v in quantizer.items())


def test_nan_loss_stops_with_step_and_terms_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    cfg = make_cfg(*tiny_overrides(data_dir, steps=8, val_every=2))
    with pytest.raises(TrainingDiverged) as info:
        run_with(cfg, tmp_path, Recorder(poison_at=3))
    message = str(info.value)
    assert "step 4" in message and "total=nan" in message and "l2=nan" in message and "grad_norm=" in message
    kept = list_checkpoints(tmp_path)
    assert kept, "the checkpoint of step 2 must survive"
    for path in kept:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["vistok"]["step"] <= 2
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_adversarial_start_and_max_steps_count_generator_steps(data_dir, tmp_path):
    cfg = make_cfg(*tiny_overrides(data_dir, steps=5, val_every=5), "loss.adversarial.weight=0.1",
                   "loss.adversarial.start=2", "loss.adversarial.num_layers=1", "loss.adversarial.channels=8",
                   "loss.adversarial.lecam_weight=0.01")
    result = run_training(cfg, tmp_path)
    assert result.step == 5
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    generator, discriminator = ckpt["optimizer_states"]
    assert {int(s["step"]) for s in generator["state"].values()} == {5}
    assert {int(s["step"]) for s in discriminator["state"].values()} == {3}  # steps 3, 4, 5
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [5, 5]
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["lecam.ema_real"] != 0


def test_settings_are_checked_before_training(data_dir, tmp_path):
    base = tiny_overrides(data_dir)
    cases = {
        "validation.token_counts=[4,64]": "validation.token_counts has 64",
        "model.image_size=18": "not a multiple of patch_size",
        "quantizer._target_=tokenizers.quantizers.Nope": "Unknown quantizer _target_",
        "loss.perceptual.weight=0.1": "VGG16 weights",
        "+loss.l3_weight=1": "unknown setting(s) loss.l3_weight",
        "trainer.precision=16-mixed": "not supported",
    }
    for override, message in cases.items():
        extra = ["loss.perceptual.weights_path=/nonexistent/vgg16.pth"] if "perceptual" in override else []
        with pytest.raises(VistokError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run_training(make_cfg(*base, override, *extra), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_every_setting_has_one_default_and_it_is_train_yaml():
    from dataclasses import MISSING, fields, is_dataclass

    from vistok.tokenizers.containers import plain
    from vistok.tokenizers.training import settings
    from vistok.tokenizers.training.module import TokenizerModule

    classes = [cls for cls in vars(settings).values() if isinstance(cls, type) and is_dataclass(cls)]
    assert len(classes) == 6
    for cls in classes:  # names and types only: a value here would be a second default
        assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(cls)), cls
    tokenizer = {"arch": "titok", "preset": "tiny", "image_size": 16, "patch_size": 4, "num_tokens": 8, "width": 16,
                 "depth": 1, "heads": 2, "quantizer": {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [5, 3, 3]}}
    composed = make_cfg("~experiment")  # train.yaml as `vistok train` composes it, no experiment on top
    module = TokenizerModule(tokenizer)  # from Python, nothing given: the same values
    for block in settings.BLOCKS:
        assert module.hparams[block] == plain(composed[block]), block
    # a partial nested block keeps train.yaml's other values; a key that is no setting is an error naming it
    module = TokenizerModule(tokenizer, loss={"adversarial": {"weight": 0.1, "num_layers": 1}})
    assert module.hparams["loss"]["adversarial"] == {**plain(composed.loss.adversarial), "weight": 0.1, "num_layers": 1}
    with pytest.raises(VistokError, match=r"unknown setting\(s\) loss\.adversarial\.wieght;"):
        TokenizerModule(tokenizer, loss={"adversarial": {"wieght": 0.1}})
    assert module.val_token_counts == [1, 2, 4, 8]  # validation.token_counts: null is K/8, K/4, K/2, K


def test_train_py_config_errors_exit_2_with_one_sentence(tmp_path):
    for args, message in (
        (["quantizer=nope"], "unknown quantizer 'nope'; choose one of fsq, fsq_flextok, gaussian, lfq, soft, vq, vq_titok, vq_vqgan"),
        (["validation.token_counts=[1,64]", f"run_dir={tmp_path / 'run'}"], "validation.token_counts has 64"),
    ):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True, check=False,
                                text=True, timeout=180)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: ")
        assert message in result.stderr and "Traceback" not in result.stderr


def test_resume_auto_picks_the_newest_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    (tmp_path / "checkpoints").mkdir()
    old, new = tmp_path / "checkpoints" / "best-0000002.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    old.write_bytes(b"a")
    new.write_bytes(b"b")
    os.utime(old, (1, 1))
    (tmp_path / "checkpoints" / ".last.ckpt.x.tmp").write_bytes(b"partial")
    assert resolve_resume("auto", tmp_path) == new
    assert resolve_resume(str(old), tmp_path) == old
    with pytest.raises(VistokError, match="neither 'auto' nor an existing checkpoint"):
        resolve_resume(str(tmp_path / "missing.ckpt"), tmp_path)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_ddp_two_cpu_processes_keep_weights_and_vq_codebook_identical(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(data_dir, steps=4, val_every=4), "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "logger=none", f"run_dir={run_dir}",
            "quantizer=vq", "quantizer.dim=4", "quantizer.codebook_size=64", "quantizer.ema=true",
            "quantizer.dead_code_steps=1", "+quantizer.restart_samples_per_step=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True, check=False,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "rank_consistency.json").read_text())
    assert report["world_size"] == 2 and report["step"] == 4 and report["differing"] == []
    rank0, rank1 = report["ranks"]
    assert rank0 == rank1 and "tokenizer.quantizer.codebook" in rank0 and "ema.module.quantizer.codebook" in rank0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["vistok"]["step"] == 4
    assert torch.isfinite(ckpt["state_dict"]["tokenizer.quantizer.codebook"]).all()
