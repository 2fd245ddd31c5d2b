"""Training: Lightning module, Hydra configs, train.py, checkpoints, resume, NaN stop, DDP.

Every run here is tiny (16 px images, a one-block TiTok of width 16, a few steps) on the
embedded sample data built once per session at 16 px with few crops, CPU only.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from vistok.tokenizers.atomic import stale_temp_files
from vistok.tokenizers.training.callbacks import AtomicCheckpointIO, RankConsistencyCheck, tensor_fingerprints
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.model import build_tokenizer
from vistok.tokenizers.training.module import TrainingDiverged
from vistok.tokenizers.training.run import list_checkpoints, resolve_resume, run_training
from vistok.tokenizers.training.signals import Interrupted

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


class Recorder(pl.Callback):
    """Keeps what a test wants to see of a run: the step it starts at, optimizer state at a step."""

    def __init__(self, capture_at: int | None = None, crash_at: int | None = None, poison_at: int | None = None):
        self.capture_at, self.crash_at, self.poison_at = capture_at, crash_at, poison_at
        self.start_step: int | None = None
        self.start_optimizer: dict | None = None
        self.captured: dict | None = None
        self.batches: list[torch.Tensor] = []  # the training images of each step

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.start_optimizer = _clone(trainer.optimizers[0].state_dict())
        self.start_ema = _clone(pl_module.ema.module.state_dict())
        self.start_quantizer = _clone(pl_module.tokenizer.quantizer.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["image"].clone())

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


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsq_run(data_dir, tmp_path_factory, make_cfg):
    run_dir = tmp_path_factory.mktemp("fsq-run")
    cfg = make_cfg(*tiny_overrides(data_dir), "quantizer=fsq", *SMALL_CODEBOOKS["fsq"])
    return run_training(cfg, run_dir)


@pytest.mark.parametrize("quantizer", ["vq", "lfq", "soft", "gaussian"])
def test_few_step_fit_for_each_quantizer(quantizer, data_dir, tmp_path, make_cfg):
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
    mean = sum(fsq_run.metrics[f"val/psnr@{k}"] for k in fsq_run.token_counts) / len(fsq_run.token_counts)
    assert fsq_run.metrics["val/psnr_mean"] == pytest.approx(mean)
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
    assert fsq_run.best_monitor == "val/psnr" and f"(best: {fsq_run.best_score:.2f} dB at 8 tokens)" in table


def test_the_best_checkpoint_can_be_chosen_by_the_mean_psnr_over_the_token_counts(data_dir, tmp_path, make_cfg):
    # rd32's setting: with late tail-token dropout, PSNR at K alone can peak before the prefixes decode
    cfg = make_cfg(*tiny_overrides(data_dir, steps=4, val_every=1), "callbacks.checkpoint.monitor=val/psnr_mean")
    result = run_training(cfg, tmp_path)
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    scores = {int(float(row[header.index("step")])): float(row[header.index("val/psnr_mean")])
              for row in (line.split(",") for line in rows[1:]) if row[header.index("val/psnr_mean")]}
    best_step = max(scores, key=scores.get)
    assert len(scores) >= 3 and result.best_monitor == "val/psnr_mean"
    assert result.best_score == pytest.approx(scores[best_step])
    assert result.checkpoint.name == f"best-{best_step + 1:07d}.ckpt"  # Lightning logs val at step - 1
    assert f"(best: {result.best_score:.2f} dB mean PSNR over 1, 2, 4, 8 tokens)" in result.table


def test_a_checkpoint_monitor_that_validation_does_not_log_is_refused_before_training(data_dir, tmp_path, make_cfg):
    cfg = make_cfg(*tiny_overrides(data_dir), "callbacks.checkpoint.monitor=val/psnr@64")
    with pytest.raises(VistokError, match=r"callbacks.checkpoint.monitor is val/psnr@64, which validation does not log; use one of .*val/psnr@8"):
        run_training(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


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


def test_resume_continues_at_the_right_step_with_the_same_optimizer_state(data_dir, tmp_path, make_cfg, run_with):
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_with(make_cfg(*overrides, "resume=auto"), tmp_path, second)
    assert second.start_step == 3 and result.step == 6
    # step 3 is inside the first epoch (data.batches_per_epoch=50): the loader's state came with the
    # checkpoint, so Lightning resumes it as a resumable loader, and the rest of the epoch is new data,
    # not the first run's batches again
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] == 0
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]
    assert len(first.batches) == 4 and len(second.batches) == 3
    assert not any(torch.equal(new, old) for new in second.batches for old in first.batches)
    assert_same_optimizer_state(second.start_optimizer, first.captured)
    assert saved["lr_schedulers"][0]["last_epoch"] == 3
    assert all(torch.equal(second.start_ema[k], v) for k, v in saved["ema_state_dict"].items())
    quantizer = {k[len("tokenizer.quantizer."):]: v for k, v in saved["state_dict"].items() if k.startswith("tokenizer.quantizer.")}
    assert {"codebook", "cluster_size", "embed_sum", "steps_unused"} <= quantizer.keys()
    assert all(torch.equal(second.start_quantizer[k], v) for k, v in quantizer.items())


def test_nan_loss_stops_with_step_and_terms_and_keeps_last_good_checkpoint(data_dir, tmp_path, make_cfg, run_with):
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


def test_adversarial_start_and_max_steps_count_generator_steps(data_dir, tmp_path, make_cfg):
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


def test_settings_are_checked_before_training(data_dir, tmp_path, make_cfg):
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


def test_every_setting_has_one_default_and_it_is_train_yaml(make_cfg):
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
    (tmp_path / "a-file").write_text("")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    for args, message in (
        (["quantizer=nope"], "unknown quantizer 'nope'; choose one of fsq, fsq_flextok, gaussian, lfq, lfq_magvit2, soft, vq, vq_titok, vq_vqgan"),
        (["validation.token_counts=[1,64]", f"run_dir={tmp_path / 'run'}"], "validation.token_counts has 64"),
        ([f"run_dir={tmp_path / 'a-file' / 'run'}"], f"run_dir {tmp_path / 'a-file' / 'run'} is inside {tmp_path / 'a-file'}, which is a file"),
        # refused inside the run, after Hydra made the dated run folder: the folder goes again
        ([f"resume={tmp_path / 'notes.ckpt'}"], f"{tmp_path / 'notes.ckpt'} is not a PyTorch checkpoint"),
    ):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True, check=False,
                                text=True, timeout=180)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: ")
        assert message in result.stderr and "Traceback" not in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "notes.ckpt"], args  # no run folder left


def test_resume_auto_picks_the_newest_checkpoint(tmp_path):
    assert list_checkpoints(tmp_path) == []
    (tmp_path / "checkpoints").mkdir()
    old, new = tmp_path / "checkpoints" / "best-0000002.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    old.write_bytes(b"a")
    new.write_bytes(b"b")
    os.utime(old, (1, 1))
    (tmp_path / "checkpoints" / ".last.ckpt.x.tmp").write_bytes(b"partial")
    assert list_checkpoints(tmp_path) == [new, old]
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True, check=False,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the thumbnail baseline is reduced over both ranks like the metrics: the same images in both columns
    header = next(line for line in result.stdout.splitlines() if line.startswith("validation at step 4 (EMA weights, "))
    images = int(header.split(", ")[1].split()[0])
    assert images == 2 * 8 and f"bicubically ({images} images)" in result.stdout, result.stdout
    report = json.loads((run_dir / "rank_consistency.json").read_text())
    assert report["world_size"] == 2 and report["step"] == 4 and report["differing"] == []
    rank0, rank1 = report["ranks"]
    assert rank0 == rank1 and "tokenizer.quantizer.codebook" in rank0 and "ema.module.quantizer.codebook" in rank0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["vistok"]["step"] == 4
    assert torch.isfinite(ckpt["state_dict"]["tokenizer.quantizer.codebook"]).all()


# ---------------------------------------------------------------------------------------------
# Runs that always end with a result, never lose work, never crash (issue 12)


def with_setting(args: list[str], setting: str) -> list[str]:
    """``args`` with ``setting`` (key=value) replacing the key's value: a key given twice is refused."""
    key = setting.split("=", 1)[0]
    return [arg for arg in args if arg.split("=", 1)[0] != key] + [setting]


def test_a_run_shorter_than_the_validation_interval_still_validates_checkpoints_and_reports(data_dir, tmp_path, make_cfg):
    result = run_training(make_cfg(*tiny_overrides(data_dir, steps=3, val_every=500)), tmp_path)
    assert result.step == 3 and math.isfinite(result.metrics["val/psnr@8"])
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3
    assert result.checkpoint == tmp_path / "checkpoints" / "best-0000003.ckpt"
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert f"checkpoint: {result.checkpoint}" in result.table and f"run:        {tmp_path} (3 steps" in result.table
    # the thumbnail column describes the very images the tokenizer's columns do
    images = f"{result.metrics['val/images']:.0f} images)"
    assert result.table.count(images) == 2, result.table


class Deliver(pl.Callback):
    """At ``step``, runs the handler installed for ``signum`` as the OS would on delivery."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:  # inside the step, as a real signal would arrive
            signal.getsignal(self.signum)(self.signum, None)


def test_sigterm_saves_last_ckpt_at_the_step_boundary_and_stops(data_dir, tmp_path, make_cfg, run_with):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        run_with(make_cfg(*tiny_overrides(data_dir, steps=50, val_every=50)), tmp_path, Deliver(3, signal.SIGTERM))
    stop = info.value
    assert stop.code == 128 + signal.SIGTERM and stop.step == 4  # step 4 was running when it arrived
    assert str(stop) == (f"stopped by SIGTERM at step 4; saved {tmp_path / 'checkpoints' / 'last.ckpt'}; "
                         f"continue with resume=auto run_dir={tmp_path}")
    assert torch.load(stop.checkpoint, map_location="cpu", weights_only=True)["global_step"] == 4
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with the run


def _read_until(process: subprocess.Popen, needle: str, timeout: float) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared; output so far:\n{seen[-3000:]}")


def test_ctrl_c_saves_a_checkpoint_then_resume_auto_reaches_max_steps(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(data_dir, steps=100000, val_every=100000), f"run_dir={run_dir}"]
    args = with_setting(with_setting(args, "trainer.enable_progress_bar=true"), "callbacks.progress.line_every_s=0")
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _read_until(first, "step 3/100000", timeout=240)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("train.py: stopped by SIGINT at step ") and message.endswith(
        f"; saved {run_dir / 'checkpoints' / 'last.ckpt'}; continue with resume=auto run_dir={run_dir}"), message
    step = int(message.split(" at step ")[1].split(";")[0])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == step

    second = subprocess.run([sys.executable, str(ROOT / "train.py"), *with_setting(args, f"trainer.max_steps={step + 2}"),
                             "resume=auto"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} at step {step}" in out
    assert f"step {step + 2}/{step + 2} (100%)" in out  # plain progress lines: stdout is not a terminal
    assert "\r" not in out and "\r" not in second.stderr
    assert f"run:        {run_dir} ({step + 2} steps" in out
    log = (run_dir / "train.log").read_text()
    assert f"validation at step {step + 2}: " in log and "tokens   bits  PSNR dB" in log and f"run:        {run_dir}" in log


def test_bad_resume_checkpoints_are_refused_before_training_and_auto_falls_back(fsq_run, data_dir, tmp_path, make_cfg,
                                                                                 caplog):
    good = fsq_run.run_dir / "checkpoints" / "last.ckpt"
    text, cut = tmp_path / "notes.ckpt", tmp_path / "cut.ckpt"
    text.write_text("not a checkpoint\n")
    cut.write_bytes(good.read_bytes()[:5000])
    base = [*tiny_overrides(data_dir, steps=6, val_every=6), "quantizer=fsq", *SMALL_CODEBOOKS["fsq"]]
    for path, message in ((text, "is not a PyTorch checkpoint"), (cut, "is not a readable PyTorch checkpoint")):
        with pytest.raises(VistokError, match=message):
            run_training(make_cfg(*base, f"resume={path}"), tmp_path / "never")
    assert not (tmp_path / "never").exists()

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    older = shutil.copy(good, run_dir / "checkpoints" / "best-0000004.ckpt")
    os.utime(older, (1, 1))
    shutil.copy(cut, run_dir / "checkpoints" / "last.ckpt")  # corrupted, and the newest
    caplog.set_level("INFO")
    result = run_training(make_cfg(*base, "resume=auto", f"run_dir={run_dir}"), run_dir)
    assert result.step == 6
    assert f"resuming from {older} at step 4 (newer last.ckpt did not load)" in caplog.text

    for path in list_checkpoints(run_dir):
        path.write_text("broken\n")
    with pytest.raises(VistokError, match=r"none of the 3 checkpoint\(s\) in .* loads"):
        run_training(make_cfg(*base, "resume=auto", f"run_dir={run_dir}"), run_dir)


def test_resuming_with_a_config_that_builds_another_model_is_one_sentence_before_training(fsq_run, data_dir, tmp_path,
                                                                                         make_cfg):
    """Say a recipe's model option changed since the run started: Lightning would fail inside fit with a
    state-dict traceback; the run names the settings that differ instead, and writes nothing."""
    good = fsq_run.run_dir / "checkpoints" / "last.ckpt"
    base = [*tiny_overrides(data_dir, steps=6, val_every=6), "quantizer=fsq", *SMALL_CODEBOOKS["fsq"], "model.decoder_head_channels=8"]
    expected = r"was trained with another model than this run's config builds \(decoder_head_channels: 16 there, 8 here.*init_from="
    with pytest.raises(VistokError, match=expected):
        run_training(make_cfg(*base, f"resume={good}"), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(good, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(VistokError, match=expected):  # not "none of the checkpoints loads": older ones would not fit either
        run_training(make_cfg(*base, "resume=auto", f"run_dir={run_dir}"), run_dir)
    assert sorted(p.name for p in run_dir.rglob("*") if p.is_file()) == ["last.ckpt"]


def test_resume_auto_in_an_empty_run_dir_says_it_starts_at_step_0(tmp_path, caplog):
    caplog.set_level("INFO")
    assert resolve_resume("auto", tmp_path) == (None, 0)
    assert f"no checkpoint in {tmp_path}: starting at step 0" in caplog.text


def test_kill_9_during_a_checkpoint_write_then_a_restart_leaves_no_temporary_file(data_dir, tmp_path, make_cfg):
    folder = tmp_path / "checkpoints"
    script = ("import time, torch\n"
              "from vistok.tokenizers.training.callbacks import AtomicCheckpointIO\n"
              "def slow_save(obj, handle, *args, **kwargs):\n"
              "    handle.write(b'half a checkpoint'); handle.flush(); time.sleep(600)\n"
              "torch.save = slow_save\n"
              f"AtomicCheckpointIO().save_checkpoint({{'step': 80}}, {str(folder / 'best-0000080.ckpt')!r})\n")
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not stale_temp_files(folder) and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        writer.kill()  # SIGKILL: no handler, no cleanup
        writer.wait()
    left = stale_temp_files(folder)
    assert len(left) == 1 and left[0].name.startswith(".best-0000080.ckpt.") and left[0].name.endswith(".tmp")
    (folder / "notes.tmp").write_text("not vistok's")  # other names are left alone

    result = run_training(make_cfg(*tiny_overrides(data_dir, steps=2, val_every=2), "resume=auto"), tmp_path)
    assert result.step == 2
    assert stale_temp_files(folder) == [] and (folder / "notes.tmp").is_file()


def test_command_line_mistakes_are_refused_in_one_sentence_before_anything_is_created(tmp_path):
    from vistok.train import compose_problem

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = {
        # the shell expanded data.train_urls=/d/shard-{000000..000001}.tar into two arguments
        ("data.train_urls=/d/shard-000000.tar", "data.train_urls=/d/shard-000001.tar"):
            "data.train_urls is given 2 times on the command line",
        ("trainer.max_step=3",): "trainer.max_step is not a setting; did you mean trainer.max_steps?",
        ("quantizr=vq",): "quantizr is not a setting; did you mean quantizer?",
        (f"run_dir={blocker}/run",): f"run_dir {blocker}/run is inside {blocker}, which is a file",
        ("resume=auto",): "resume=auto continues the run in run_dir, but run_dir is the dated default",
    }
    for args, message in cases.items():
        problem = compose_problem(list(args))
        assert problem is not None and message in problem and problem.endswith((".", "?")), (args, problem)
    assert "'data.train_urls=/data/shard-{000000..000003}.tar'" in compose_problem(list(next(iter(cases))))
    assert compose_problem([f"run_dir={tmp_path / 'fine'}", "resume=auto"]) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_rank_consistency_check_fails_when_a_rank_holds_different_weights(tmp_path, monkeypatch):
    module = torch.nn.Linear(2, 2)
    mine = tensor_fingerprints(module)
    other = {**mine, "weight": "0" * 64}  # rank 1's weight differs
    ranks = [mine, other]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), ranks))
    trainer = SimpleNamespace(world_size=2, is_global_zero=True, global_step=7)
    with pytest.raises(RuntimeError, match=r"different values of 1 tensor\(s\), first weight"):
        RankConsistencyCheck(tmp_path).on_train_end(trainer, module)
    assert json.loads((tmp_path / "rank_consistency.json").read_text())["differing"] == ["weight"]
    ranks[1] = mine
    RankConsistencyCheck(tmp_path).on_train_end(trainer, module)  # identical ranks pass
    assert json.loads((tmp_path / "rank_consistency.json").read_text())["differing"] == []


def test_short_run_with_the_perceptual_loss_on_random_vgg_weights(data_dir, tmp_path, make_cfg):
    from torchvision.models.vgg import cfgs, make_layers

    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, tmp_path / "vgg16.pth")
    cfg = make_cfg(*tiny_overrides(data_dir, steps=2, val_every=2), "loss.perceptual.weight=0.5",
                   f"loss.perceptual.weights_path={tmp_path / 'vgg16.pth'}")
    result = run_training(cfg, tmp_path / "run")
    assert result.step == 2 and math.isfinite(result.metrics["val/psnr"])
    rows = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("train/perceptual")
    values = [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]
    assert values and all(math.isfinite(v) and v > 0 for v in values)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("perceptual.") for k in ckpt["state_dict"])  # frozen LPIPS is not saved


def test_short_run_with_the_conv_model(data_dir, tmp_path, make_cfg):
    cfg = make_cfg(*[arg for arg in tiny_overrides(data_dir, steps=2, val_every=2) if not arg.startswith("model.")],
                   "model=conv", "model.image_size=16", "model.channels=8", "model.channel_mult=[1,2,2]",
                   "model.num_res_blocks=1", "quantizer=vq", *SMALL_CODEBOOKS["vq"])
    result = run_training(cfg, tmp_path)
    assert result.step == 2 and result.token_counts[-1] == 16 and math.isfinite(result.metrics["val/psnr"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["tokenizer"]["arch"] == "conv"


def test_finite_check_runs_at_the_logging_interval_by_default_with_no_host_sync_between(make_cfg):
    from vistok.eval.bench.train_step import audit_training_step
    from vistok.tokenizers.training.run import tokenizer_config

    tokenizer = tokenizer_config(make_cfg(*TINY_MODEL, "quantizer=fsq", *SMALL_CODEBOOKS["fsq"]))
    images = torch.rand(2, 3, 16, 16)
    assert make_cfg().optim.finite_check_every is None
    assert dict(audit_training_step(tokenizer, images, steps=3).syncs) == {}  # log_every_n_steps is 50
    every_step = audit_training_step(tokenizer, images, steps=3, optim={"finite_check_every": 1})
    assert dict(every_step.syncs) == {"_local_scalar_dense": 3}


class BarReader(pl.Callback):
    """What the progress bar shows after each step."""

    def __init__(self) -> None:
        self.shown: list[tuple[int, int, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.shown.append((bar.n, bar.total, bar.desc))


def test_progress_bar_on_a_terminal_counts_steps_to_max_steps_with_the_loss(data_dir, tmp_path, make_cfg, run_with, capsys):
    from vistok.tokenizers.training.callbacks import StepProgressBar

    args = with_setting(tiny_overrides(data_dir, steps=4, val_every=500), "trainer.enable_progress_bar=true")
    reader = BarReader()
    run_with(make_cfg(*args, "trainer.log_every_n_steps=2", "+callbacks.progress.terminal=true"), tmp_path, reader)
    assert [(n, total) for n, total, _ in reader.shown] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # not 50-step epochs
    assert reader.shown[-1][2].startswith("step")
    out = capsys.readouterr().out
    assert "4/4" in out and "loss=" in out
    assert not StepProgressBar(terminal=False).is_enabled  # a log file gets plain lines instead (see the Ctrl-C test)


THUMBNAIL_RANK = """
import os, sys, torch
from types import SimpleNamespace
from vistok.tokenizers.training.callbacks import ThumbnailBaseline
rank = int(os.environ["RANK"])
torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
images = torch.rand(3 + 2 * rank, 3, 16, 16, generator=torch.Generator().manual_seed(rank))  # uneven shares
module = SimpleNamespace(tokenizer=SimpleNamespace(codebook_size=32, token_dim=4), val_token_counts=[2, 8],
                         device=torch.device("cpu"))
trainer = SimpleNamespace(sanity_checking=False)
baseline = ThumbnailBaseline()
baseline.on_validation_epoch_start(trainer, module)
baseline.on_validation_batch_end(trainer, module, None, {"image": images}, 0)
baseline.on_validation_epoch_end(trainer, module)
torch.save({"psnr": baseline.psnr, "images": baseline.images, "mine": images}, sys.argv[2] + f"/rank{rank}.pt")
# leave together: a rank that exits while gloo still talks to the other can abort ("terminate called ...")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_thumbnail_baseline_is_reduced_over_ranks_like_the_metrics(tmp_path):
    from vistok.eval.baselines import thumbnail_reconstruct
    from vistok.eval.metrics import bits_per_image, psnr_per_image

    ranks = [subprocess.Popen([sys.executable, "-c", THUMBNAIL_RANK, str(tmp_path / "init"), str(tmp_path)], cwd=tmp_path,
                              env={**os.environ, "RANK": str(rank)}) for rank in range(2)]
    assert [rank.wait(timeout=240) for rank in ranks] == [0, 0]
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    union = torch.cat([result["mine"] for result in results])
    for result in results:  # both ranks report the PSNR of all 8 images, not of their own 3 or 5
        assert result["images"] == 8
        for k in (2, 8):
            expected = psnr_per_image(thumbnail_reconstruct(union, bits_per_image(k, 32, 4)), union).mean().item()
            assert math.isclose(result["psnr"][k], expected, rel_tol=1e-9), (k, result["psnr"][k], expected)


def test_periodic_checkpoints_are_written_between_validations(data_dir, tmp_path, make_cfg, run_with):
    cfg = make_cfg(*tiny_overrides(data_dir, steps=8, val_every=500), "callbacks.periodic.every_n_train_steps=2",
                   "callbacks.periodic.train_time_interval=null")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_with(cfg, tmp_path, Recorder(crash_at=5))
    assert not (tmp_path / "metrics.json").exists()  # no validation ran
    assert [p.name for p in list_checkpoints(tmp_path)] == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
