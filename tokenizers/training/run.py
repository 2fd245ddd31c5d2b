"""Run one training from a composed config: what ``vistok train`` (``python train.py``) does after Hydra.

:func:`run_training` checks the whole configuration (model, quantizer, data, trainer, logger,
callbacks, resume) before the first step, so a mistake costs one sentence and no compute; then
fits, and returns where the results are. The config is the Hydra one described in
``configs/train.yaml``; tests compose it with Hydra's compose API and call this directly.

Run directory layout (``run_dir``)::

    config.yaml               the resolved configuration
    checkpoints/last.ckpt     newest state (optimizer, schedules, EMA, step, quantizer buffers)
    checkpoints/best-*.ckpt   best validation PSNR at the full token count
    hpc_ckpt_*.ckpt           written by Lightning on SLURM preemption (SIGUSR1)
    metrics.json              latest validation metrics
    grids/step-*.png          reconstructions: originals, then each validated token count
    logs/version_N/metrics.csv  the CSV logger's history (logger=csv; one version per resume); wandb/ for wandb
    train.log                 Hydra's log of the run
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from vistok.tokenizers.atomic import atomic_write_text, check_writable, stale_temp_files
from vistok.tokenizers.containers import plain
from vistok.tokenizers.training.callbacks import (
    AtomicCheckpointIO,
    FinishAtLastStep,
    RankConsistencyCheck,
    RunArtifacts,
    ThumbnailBaseline,
)
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.training import finetune
from vistok.tokenizers.training.module import TokenizerModule
from vistok.tokenizers.training.signals import StopOnSignal

log = logging.getLogger(__name__)

# Top-level keys of configs/train.yaml (experiment/ merges into the others); anything else is refused.
TOP_LEVEL = {"name", "seed", "run_dir", "resume", "init_from", "freeze", "compile", "teacher", "loss", "optim", "ema", "validation",
             "model", "quantizer", "data", "trainer", "logger", "callbacks"}
SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "bf16-true", "64-true")


def wandb_offline() -> bool:
    """True unless the user chose online mode or is logged in (WANDB_API_KEY or ``wandb login``).

    Read by ``configs/logger/wandb.yaml`` through the ``vistok_wandb_offline`` resolver, so the
    mode is fixed before the process's first ``wandb.init``.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return True


OmegaConf.register_new_resolver("vistok_wandb_offline", wandb_offline, replace=True)


@dataclass
class TrainResult:
    """Where a finished run left its results."""

    run_dir: Path
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None  # the best by callbacks.checkpoint.monitor (else the newest)
    last_checkpoint: Path | None
    grid: Path | None
    token_counts: list[int]
    seconds: float
    best_score: float | None = None  # the best checkpoint's value of best_monitor
    best_monitor: str | None = None  # e.g. val/psnr (PSNR at K tokens) or val/psnr_mean (over the token counts)
    ema: bool = True  # validation used the EMA weights
    table: str = ""  # the closing summary (global rank 0 only)


# ---------------------------------------------------------------------------------------------
# Pieces built from the config (each raises VistokError naming the setting)


def tokenizer_config(cfg: DictConfig) -> dict[str, Any]:
    """``build_tokenizer`` kwargs: the model group plus the quantizer group."""
    return {**plain(cfg.model), "quantizer": plain(cfg.quantizer)}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every ``*.ckpt`` under ``run_dir``, newest first (temporary files of a write in progress excluded)."""
    found = [p for p in run_dir.rglob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    # last.ckpt is written right after best-*.ckpt at the same step: break mtime ties towards it
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def resolve_resume(resume: Any, run_dir: Path, tokenizer: bool = True,
                   model: torch.nn.Module | None = None) -> tuple[Path | None, int]:
    """The checkpoint to continue from and its step: ``(None, 0)`` for a fresh start.

    ``tokenizer=False`` accepts any Lightning checkpoint (the AR probe's), not only a tokenizer's.
    ``model``: the tokenizer this run's config builds; the checkpoint's weights must fit it (see
    :func:`check_weights_fit`).

    ``resume`` is None (a fresh run; refused if ``run_dir`` already holds checkpoints), ``"auto"``
    (the newest checkpoint in ``run_dir`` that loads, saying so when a newer one does not) or a
    path. Every candidate is read before training, so a text file, a truncated ``.ckpt`` or a
    corrupted ``last.ckpt`` is one sentence (VistokError), not a traceback from inside ``fit``.
    """
    existing = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if resume is None:
        if existing:
            raise VistokError(
                f"the run directory {run_dir} already holds checkpoints ({existing[0].name}); "
                "continue that run with resume=auto, or start a new one with another run_dir."
            )
        return None, 0
    if resume == "auto":
        if not existing:
            log.info("no checkpoint in %s: starting at step 0", run_dir)
            return None, 0
        refused: list[str] = []
        for path in existing:
            try:
                step, ckpt = _read_resumable(path, tokenizer)
            except VistokError as error:
                log.warning("%s", error)
                refused.append(path.name)
                continue
            if model is not None:  # outside the try: a model that does not fit is no reason to go back further
                check_weights_fit(ckpt, model, path)
            skipped = f" (newer {', '.join(refused)} did not load)" if refused else ""
            log.info("resuming from %s at step %d%s", path, step, skipped)
            return path, step
        raise VistokError(f"none of the {len(existing)} checkpoint(s) in {run_dir} loads ({', '.join(refused)}; the warnings above "
                          "say why); pass resume=PATH of an intact .ckpt, or move them away to start again at step 0.")
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise VistokError(f"resume={resume} is neither 'auto' nor an existing checkpoint file; pass resume=auto or the path of a .ckpt.")
    step, ckpt = _read_resumable(path, tokenizer)
    if model is not None:
        check_weights_fit(ckpt, model, path)
    log.info("resuming from %s at step %d", path, step)
    return path, step


def check_weights_fit(ckpt: dict[str, Any], model: torch.nn.Module, path: Path) -> None:
    """Refuse, in one sentence, a checkpoint whose tokenizer weights do not fit ``model``: the run's config
    now builds another model (say a recipe's model option changed since the run started), which
    Lightning would otherwise report as a state-dict traceback from inside ``fit``."""
    from vistok.tokenizers.export import TOKENIZER_PREFIX, check_state_dict, strip_prefix

    try:
        check_state_dict(model, strip_prefix(ckpt["state_dict"], TOKENIZER_PREFIX), str(path), "this run's config")
    except VistokError as mismatch:
        was, now = ckpt["hyper_parameters"]["tokenizer"], getattr(model, "config", {})
        changed = [f"{key}: {_shown(was, key)} there, {_shown(now, key)} here"
                   for key in sorted(set(was) | set(now)) if was.get(key) != now.get(key)]
        detail = "; ".join(changed[:4]) if changed else "its weights' names or shapes differ"
        raise VistokError(f"{path} was trained with another model than this run's config builds ({detail}); "
                          "resume with the model settings the run started with (its config.yaml lists them; null for one "
                          f"not set there), or start a new run from its weights with init_from={path}.") from mismatch


def _shown(config: dict[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else "not set"


def _read_resumable(path: Path, tokenizer: bool) -> tuple[int, dict[str, Any]]:
    """The step a training checkpoint continues from, and the checkpoint; VistokError if it does not load
    or holds no training state. ``tokenizer``: also require a tokenizer training checkpoint's layout
    (False: any Lightning checkpoint)."""
    from vistok.tokenizers.export import load_torch_file, read_checkpoint

    ckpt = read_checkpoint(path) if tokenizer else load_torch_file(path)
    if not isinstance(ckpt, dict) or not all(key in ckpt for key in ("optimizer_states", "loops", "global_step")):
        if not tokenizer:
            raise VistokError(f"{path} holds no training state (optimizer, step) to resume; pass a checkpoint the run itself wrote.")
        raise VistokError(f"{path} holds a tokenizer's weights but no training state (optimizer, step) to resume; "
                          f"start a new run from its weights with init_from={path} instead.")
    return int(ckpt["global_step"]), ckpt


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse ``resume=auto`` with the dated default run_dir, and a run_dir that cannot be written.

    The command line's check (train.py, before Hydra creates the folder); :func:`run_training`
    checks only that ``run_dir`` can be written, since a caller from Python or a sweep passes the
    folder itself.
    """
    raw = OmegaConf.to_container(cfg, resolve=False).get("run_dir")
    if cfg.get("resume") == "auto" and isinstance(raw, str) and "${now:" in raw:
        raise VistokError("resume=auto continues the run in run_dir, but run_dir is the dated default (a new folder at each "
                          "start); pass the folder of the run to continue, e.g. resume=auto run_dir=outputs/demo/<date>_<time>.")
    check_writable(run_dir, "run_dir")


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove what killed writes left in ``run_dir``, ``checkpoints/`` and ``grids/`` (vistok's temp names only)."""
    removed = [p for folder in (run_dir, run_dir / "checkpoints", run_dir / "grids") for p in stale_temp_files(folder)]
    for path in removed:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by a write that was killed", path)
    return removed


def build_module(cfg: DictConfig) -> TokenizerModule:
    # init_from: the architecture and weights stored at that path replace the model/quantizer groups
    initial = finetune.read_initial_weights(cfg.init_from) if cfg.get("init_from") else None
    if initial is not None:
        log.info("init_from %s: its %s architecture and weights (the model and quantizer groups do not apply, "
                 "except model.token_perturb)", initial.path, initial.config.get("arch"))
        # token perturbation is how this run trains, not architecture: post-training a loaded decoder on
        # perturbed tokens ("Image Tokenizer Needs Post-Training") takes this run's setting, not the loaded one's
        perturb = cfg.model.get("token_perturb") if "model" in cfg else None
        initial.config = {key: value for key, value in initial.config.items() if key != "token_perturb"}
        if perturb is not None:
            initial.config["token_perturb"] = plain(perturb)
    module = TokenizerModule(tokenizer=initial.config if initial else tokenizer_config(cfg), loss=plain(cfg.loss),
                             optim=plain(cfg.optim), ema=plain(cfg.ema), validation=plain(cfg.validation),
                             compile=bool(cfg.compile), teacher=cfg.get("teacher"))
    finetune.prepare(module, initial, plain(cfg.get("freeze")))
    if initial is not None and "data" in cfg and OmegaConf.is_interpolation(cfg.data, "image_size"):
        # data.image_size follows model.image_size, which init_from replaced by the loaded model's
        cfg.data.image_size = module.tokenizer.image_size
    return module


def build_datamodule(cfg: DictConfig, module: TokenizerModule) -> pl.LightningDataModule:
    datamodule = instantiate_config(cfg.data, "data")
    tokenizer = module.tokenizer
    size = getattr(datamodule, "image_size", None)
    if size is not None and size != tokenizer.image_size:
        raise VistokError(
            f"data.image_size is {size} but model.image_size is {tokenizer.image_size}; "
            "set both to the same resolution (data.image_size follows model.image_size unless overridden)."
        )
    validate = getattr(datamodule, "validate", None)
    if callable(validate):
        validate(multiple_of=tokenizer.patch_size)
    return datamodule


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    node = cfg.get("logger")
    if not node:  # logger=none
        return False
    overrides: dict[str, Any] = {"save_dir": str(run_dir)}
    if str(node.get("_target_", "")).endswith("WandbLogger") and node.get("id") is None:
        # one wandb run per run directory, so a resumed run continues the same wandb run
        overrides["id"] = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return instantiate_config(node, "logger", **overrides)


def build_callbacks(cfg: DictConfig, run_dir: Path, validates: bool = True, logs: bool = True,
                    val_metrics: Collection[str] | None = None) -> tuple[list[pl.Callback], RunArtifacts]:
    """The configured callbacks plus vistok's own.

    ``validates=False`` (no validation data): the best-checkpoint callback checkpoints every
    ``trainer.val_check_interval`` steps without a best one. ``logs=False`` (logger=none): no
    learning-rate monitor, which needs a logger to write to. ``trainer.enable_progress_bar=false``:
    no progress bar callback. ``val_metrics``: the names validation logs; a checkpoint monitor
    outside them (and outside ``train/``) is refused now rather than at the first validation.
    """
    callbacks: list[pl.Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:  # callbacks.lr_monitor=null switches one off
            continue
        if not logs and str(node.get("_target_", "")).endswith("LearningRateMonitor"):
            continue
        if not cfg.trainer.get("enable_progress_bar", True) and str(node.get("_target_", "")).endswith("ProgressBar"):
            continue
        extra: dict[str, Any] = {}
        if str(node.get("_target_", "")).endswith("ModelCheckpoint"):
            extra["dirpath"] = str(run_dir / "checkpoints")
            monitor = node.get("monitor")
            if validates and monitor and val_metrics is not None and monitor not in val_metrics and not str(monitor).startswith("train/"):
                raise VistokError(f"callbacks.{name}.monitor is {monitor}, which validation does not log; "
                                  f"use one of {', '.join(val_metrics)}.")
            if not validates and monitor:
                log.warning("no validation data (data.val_urls is null): no best checkpoint, only last.ckpt")
                interval = cfg.trainer.get("val_check_interval")
                extra.update(monitor=None, save_top_k=0, every_n_train_steps=interval if isinstance(interval, int) else None)
        callbacks.append(instantiate_config(node, f"callbacks.{name}", **extra))
    artifacts = RunArtifacts(run_dir)
    return callbacks + [artifacts, ThumbnailBaseline(), FinishAtLastStep(run_dir), StopOnSignal(run_dir),
                        RankConsistencyCheck(run_dir)], artifacts


def build_trainer(cfg: DictConfig, run_dir: Path, logger: Any, callbacks: list[pl.Callback]) -> pl.Trainer:
    settings = dict(plain(cfg.trainer))
    precision = str(settings.get("precision", "32-true"))
    if precision not in SUPPORTED_PRECISION:
        raise VistokError(
            f"trainer.precision={precision} is not supported (float16 needs loss scaling, which the manual "
            f"optimization here does not do); use bf16-mixed on GPUs or 32-true."
        )
    max_steps = settings.get("max_steps")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise VistokError(f"trainer.max_steps is {max_steps!r}, but the schedule needs the number of steps; set trainer.max_steps to a positive number.")
    for reserved in ("default_root_dir", "logger", "callbacks", "plugins", "gradient_clip_val"):
        if reserved in settings:
            where = "optim.grad_clip" if reserved == "gradient_clip_val" else "the run directory and the logger/callbacks groups"
            raise VistokError(f"trainer.{reserved} is set by vistok from {where}; remove it from the trainer config.")
    try:
        # SLURM (issue 7): SLURMEnvironment(auto_requeue=False) + the step-boundary requeue callback
        from vistok.tokenizers.training.slurm import slurm_support

        slurm_plugins, slurm_callbacks = slurm_support()
        return pl.Trainer(**settings, default_root_dir=str(run_dir), logger=logger, callbacks=callbacks + slurm_callbacks,
                          plugins=[AtomicCheckpointIO(), *slurm_plugins])
    except TypeError as error:
        raise VistokError(f"bad trainer setting ({error}); see lightning.pytorch.Trainer for the options.") from None
    except (MisconfigurationException, ValueError, ImportError) as error:  # Lightning's answers to bad values
        raise VistokError(f"bad trainer setting: {str(error).splitlines()[0]}") from None


def instantiate_config(node: DictConfig | dict, where: str, **overrides: Any) -> Any:
    """Hydra-instantiate the config ``node`` of setting ``where``; any failure is a VistokError naming it."""
    target = node.get("_target_") if isinstance(node, (DictConfig, dict)) else None
    if not target:
        raise VistokError(f"the {where} config has no _target_; pick one of the files in configs/{where.split('.')[0]}/.")
    try:
        return instantiate(node, **overrides)
    except InstantiationException as error:  # Hydra wraps whatever the target raised
        if isinstance(error.__cause__, VistokError):
            raise error.__cause__ from None
        message = str(error.__cause__ or error).splitlines()[0]
        raise VistokError(f"cannot build {where} ({target}): {message}; fix the {where} settings.") from None


def check_top_level(cfg: DictConfig) -> None:
    unknown = sorted(set(cfg) - TOP_LEVEL)
    if unknown:
        raise VistokError(f"unknown setting(s) {', '.join(unknown)}; the top-level settings are {', '.join(sorted(TOP_LEVEL))}.")


# ---------------------------------------------------------------------------------------------


def run_training(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """Check ``cfg``, train, and return the results; raises VistokError before training for bad settings.

    Before the first step: ``run_dir`` can be written, the resume checkpoint loads, and temporary
    files a killed write left in ``run_dir`` are removed. Ctrl-C or SIGTERM during training raises
    :class:`~vistok.tokenizers.training.signals.Interrupted` after saving ``checkpoints/last.ckpt``.

    A NaN/inf loss raises :class:`~vistok.tokenizers.training.module.TrainingDiverged` (with the step and terms);
    checkpoints written before it stay in ``run_dir``.
    """
    start = time.monotonic()
    run_dir = Path(run_dir).resolve()
    check_top_level(cfg)
    check_writable(run_dir, "run_dir")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    ckpt_path, _ = resolve_resume(cfg.resume, run_dir, model=module.tokenizer)
    logger = build_logger(cfg, run_dir)
    callbacks, artifacts = build_callbacks(cfg, run_dir, validates=getattr(datamodule, "val_urls", True) is not None,
                                           logs=logger is not False, val_metrics=module.validation_metrics)
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    if trainer.is_global_zero:
        remove_stale_temp_files(run_dir)
    _write_config(cfg, run_dir)

    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)

    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
    best = Path(checkpoint.best_model_path) if checkpoint is not None and checkpoint.best_model_path else None
    newest = list_checkpoints(run_dir)
    result = TrainResult(
        run_dir=run_dir, step=trainer.global_step, metrics=dict(module.last_val_metrics),
        checkpoint=best or (newest[0] if newest else None), last_checkpoint=newest[0] if newest else None,
        grid=artifacts.grid_path, token_counts=list(module.val_token_counts), seconds=time.monotonic() - start,
        best_score=float(checkpoint.best_model_score) if best is not None and checkpoint.best_model_score is not None else None,
        best_monitor=checkpoint.monitor if checkpoint is not None else None,
        ema=module.ema is not None,
    )
    if trainer.is_global_zero:
        tokenizer = module.tokenizer
        baseline = next(cb for cb in trainer.callbacks if isinstance(cb, ThumbnailBaseline))
        result.table = summary_table(result, tokenizer.codebook_size, tokenizer.token_dim, baseline.psnr, baseline.images)
    return result


@rank_zero_only
def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)  # the directory actually used (Hydra resolved ${now:} once)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # creates run_dir


# ---------------------------------------------------------------------------------------------
# The closing table


def describe_score(monitor: str | None, score: float, token_counts: list[int]) -> str:
    """The best checkpoint's score in words, e.g. ``20.02 dB at 16 tokens``."""
    if monitor == "val/psnr":
        return f"{score:.2f} dB at {token_counts[-1]} tokens"
    if monitor == "val/psnr_mean":
        return f"{score:.2f} dB mean PSNR over {', '.join(map(str, token_counts))} tokens"
    if monitor is not None and monitor.startswith("val/psnr@"):
        return f"{score:.2f} dB at {monitor.removeprefix('val/psnr@')} tokens"
    return f"{monitor} {score:.4g}"


def summary_table(result: TrainResult, codebook_size: int | None, token_dim: int,
                  baseline: dict[int, float], baseline_images: int) -> str:
    """Plain-text table: per token count the bits, PSNR, SSIM and the thumbnail codec's PSNR at those bits.

    Then the checkpoint, grid and run folder; a run that never validated gets those lines only.
    """
    from vistok.eval.metrics import bits_per_image

    if not result.metrics:
        lines = [f"no validation data (data.val_urls is null): no metrics at step {result.step}"]
    else:
        weights = "EMA weights" if result.ema else "weights"
        lines = [f"validation at step {result.step} ({weights}, {result.metrics.get('val/images', 0):.0f} images)",
                 f"{'tokens':>6} {'bits':>6} {'PSNR dB':>8} {'SSIM':>6} {'thumbnail PSNR dB':>18}"]
        for k in result.token_counts:
            bits = bits_per_image(k, codebook_size, token_dim)
            psnr = result.metrics.get(f"val/psnr@{k}", float("nan"))
            ssim = result.metrics.get(f"val/ssim@{k}", float("nan"))
            thumb = f"{baseline[k]:18.2f}" if k in baseline else f"{'-':>18}"
            lines.append(f"{k:>6} {bits:>6.0f} {psnr:>8.2f} {ssim:>6.3f} {thumb}")
        lines.append(f"thumbnail: each image shrunk to the largest 8-bit RGB thumbnail that fits the bits and scaled back "
                     f"bicubically ({baseline_images} images)")
    if "val/usage" in result.metrics:
        lines.append(f"codebook usage {result.metrics['val/usage']:.1%}, perplexity {result.metrics.get('val/perplexity', float('nan')):.1f} "
                     f"at {result.token_counts[-1]} tokens")
    best = f" (best: {describe_score(result.best_monitor, result.best_score, result.token_counts)})" if result.best_score is not None else ""
    lines.append(f"checkpoint: {result.checkpoint}{best}")
    if result.last_checkpoint is not None and result.last_checkpoint != result.checkpoint:
        lines.append(f"last:       {result.last_checkpoint}")
    lines.append(f"grid:       {result.grid}")
    lines.append(f"run:        {result.run_dir} ({result.step} steps, {result.seconds:.0f} s)")
    return "\n".join(lines)

