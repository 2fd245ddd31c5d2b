"""Lightning plumbing for training runs: atomic checkpoint files, run artifacts, a DDP check.

- :class:`AtomicCheckpointIO`: every checkpoint (best, last, SLURM's ``hpc_ckpt``) is written
  to a temporary name in its directory and renamed into place, so a kill at any moment leaves
  either the previous file or the new one, never a truncated one.
- :class:`RunArtifacts`: after each validation, the reconstruction grid as a PNG in the run
  directory (and to wandb when that is the logger) and ``metrics.json`` with the latest
  validation metrics, whatever logger is configured.
- :class:`RankConsistencyCheck`: at the end of a multi-process run, compares a fingerprint of
  every tensor of the module's state (weights, EMA weights, quantizer buffers such as a VQ
  codebook, the discriminator) across ranks, writes them to ``rank_consistency.json`` and fails
  the run if any rank diverged.
- :class:`FinishAtLastStep`: a run that reaches ``trainer.max_steps`` validates (and so writes
  its best and last checkpoints, grid and ``metrics.json``) at that step, whatever
  ``val_check_interval`` is; without validation data it still saves ``last.ckpt`` there.
- :class:`ThumbnailBaseline`: during validation, the PSNR of eval's thumbnail codec at each
  validated token count's bits, on the same images as the metrics (summed over ranks).
- :class:`StepProgressBar`: training progress as global step / ``max_steps`` and the loss on a
  terminal; plain log lines at an interval when stdout is not a terminal.
"""
from __future__ import annotations

import hashlib
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from vistok.tokenizers.atomic import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves go to a temporary file beside the target, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def save_png(image: torch.Tensor, path: Path) -> Path:
    """(3, H, W) float in [0, 1] -> an 8-bit PNG at ``path`` (atomically)."""
    from vistok.data.images import to_pil

    def write(handle) -> None:
        buffer = io.BytesIO()
        to_pil(image.float().clamp(0, 1)).save(buffer, format="PNG")
        handle.write(buffer.getvalue())

    atomic_write(path, write)
    return path


class RunArtifacts(pl.Callback):
    """Writes ``grids/step-XXXXXXX.png`` and ``metrics.json`` into ``run_dir`` after each validation.

    Reads ``pl_module.latest_grid`` (3, H, W) and ``pl_module.last_val_metrics`` set by
    :class:`~vistok.tokenizers.training.module.TokenizerModule`; with a wandb logger the grid is logged there too.
    ``grid_path`` is the newest grid written (None before the first validation).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.grid_path: Path | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = trainer.global_step
        grid = getattr(pl_module, "latest_grid", None)
        if grid is not None:
            self.grid_path = save_png(grid, self.run_dir / "grids" / f"step-{step:07d}.png")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    counts = ", ".join(str(k) for k in getattr(pl_module, "val_token_counts", []))
                    logger.log_image("val/reconstructions", [str(self.grid_path)], step=step,
                                     caption=[f"rows: originals, then {counts} tokens"])
        metrics = dict(pl_module.last_val_metrics)
        atomic_write_json(self.run_dir / "metrics.json", {"step": step, "metrics": metrics})
        # the run's own log (train.log) keeps every validation, whatever the logger
        log.info("validation at step %d: %s", step, ", ".join(f"{name[len('val/'):]} {value:.4g}"
                                                          for name, value in metrics.items() if name.startswith("val/")))


def tensor_fingerprints(module: torch.nn.Module) -> dict[str, str]:
    """name -> sha256 of the tensor's bytes, for every entry of ``module.state_dict()``."""
    prints = {}
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        prints[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
    return prints


class RankConsistencyCheck(pl.Callback):
    """After training with several processes, check every rank holds bit-identical tokenizer state.

    Data-parallel training must keep replicas identical; a quantizer that updates a codebook
    from local statistics, or any rank-dependent randomness, breaks that silently. This
    compares sha256 fingerprints of every entry of ``pl_module.state_dict()`` across ranks.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size < 2 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        prints = tensor_fingerprints(pl_module)
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, prints)
        differing = sorted(name for name in prints if len({ranks[name] for ranks in gathered}) > 1)
        if trainer.is_global_zero:
            record = {"world_size": trainer.world_size, "step": trainer.global_step, "differing": differing, "ranks": gathered}
            atomic_write_json(self.run_dir / "rank_consistency.json", record)
        if differing:
            raise RuntimeError(f"the {trainer.world_size} ranks ended with different values of {len(differing)} tensor(s), "
                               f"first {differing[0]}: data-parallel replicas diverged")


class FinishAtLastStep(pl.Callback):
    """Make the step that reaches ``trainer.max_steps`` end with a validation and a checkpoint.

    Lightning validates every ``val_check_interval`` steps only, so a run shorter than the
    interval (or ending between two) would end with no metrics, no best checkpoint and no table.
    Setting ``trainer.should_stop`` at the last step is Lightning's own way to ask for a
    validation before stopping (as early stopping does). Without validation data, ``last.ckpt``
    is saved at the end instead, unless a checkpoint callback already saved this step.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step < trainer.max_steps:
            return  # stopped early (a signal, SLURM): whoever stopped it saved what it needed
        saved = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last
                 and getattr(cb, "_last_global_step_saved", -1) == step]
        if not saved:
            trainer.save_checkpoint(str(self.run_dir / "checkpoints" / "last.ckpt"), weights_only=False)


class ThumbnailBaseline(pl.Callback):
    """Per validation: mean PSNR of eval's thumbnail codec at the bits of each validated token count.

    It sees the same validation batches as the tokenizer's metrics and reduces its sums over ranks
    the same way (torchmetrics), so the two columns of the closing table describe the same images.
    ``psnr`` ({token count: dB}) and ``images`` hold the latest validation's result.
    """

    def __init__(self) -> None:
        self.psnr: dict[int, float] = {}
        self.images = 0
        self._metrics: torch.nn.ModuleDict | None = None
        self._bits: dict[int, float] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from vistok.eval.metrics import MeanPSNR, bits_per_image

        tokenizer = pl_module.tokenizer
        counts = list(pl_module.val_token_counts)
        self._bits = {k: bits_per_image(k, tokenizer.codebook_size, tokenizer.token_dim) for k in counts}
        self._metrics = torch.nn.ModuleDict({str(k): MeanPSNR() for k in counts}).to(pl_module.device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        from vistok.eval.baselines import thumbnail_reconstruct

        images = batch["image"].float()
        with torch.no_grad():
            for k, bits in self._bits.items():
                self._metrics[str(k)].update(thumbnail_reconstruct(images, bits), images)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metrics is None or trainer.sanity_checking:
            return
        self.psnr = {int(k): float(metric.compute()) for k, metric in self._metrics.items()}  # all-reduced
        first = next(iter(self._metrics.values()))
        with first.sync_context():  # compute() puts each rank's own count back; the table wants the total
            self.images = int(first.count)
        self._metrics = None


class StepProgressBar(TQDMProgressBar):
    """Training progress counted in generator steps up to ``trainer.max_steps``, with the loss.

    Lightning's bar counts the data's "epochs" (``data.batches_per_epoch`` steps each). On a
    terminal this bar shows ``step N/max_steps`` and the latest total loss and validation PSNR.
    When stdout is not a terminal (a log file, a batch job), tqdm's carriage-return frames would
    fill the log, so there are no bars; instead one plain log line at a logging step
    (``trainer.log_every_n_steps``) when ``line_every_s`` seconds have passed since the last one,
    and one at the last step. The loss is read back from the device only when shown.

    Args:
        line_every_s: least seconds between two plain lines (0: a line at every logging step).
        terminal: whether stdout is a terminal (None: ask ``sys.stdout.isatty()``).
    """

    def __init__(self, line_every_s: float = 30.0, terminal: bool | None = None) -> None:
        super().__init__()
        if line_every_s < 0:
            raise ValueError(f"line_every_s is {line_every_s}; it must be >= 0")
        self.line_every_s = float(line_every_s)
        self.terminal = sys.stdout.isatty() if terminal is None else bool(terminal)
        self._last_line = float("-inf")
        self._start: tuple[float, int] = (0.0, 0)
        if not self.terminal:
            self.disable()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        loss = trainer.callback_metrics.get("train/total")
        if loss is not None:
            shown["loss"] = f"{float(loss):.4g}"
        psnr = trainer.callback_metrics.get("val/psnr")
        if psnr is not None:
            shown["val_psnr"] = f"{float(psnr):.2f}"
        return shown

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # a resumed run: rate and ETA count this run's steps only
        bar.set_description("step")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        logging_step = step % max(1, trainer.log_every_n_steps) == 0 or step == total
        bar = self.train_progress_bar
        if self.is_enabled and bar is not None:
            bar.update(step - bar.n)  # tqdm redraws at most every mininterval
            if logging_step:
                bar.set_postfix(self.get_metrics(trainer, pl_module))
        elif not self.terminal and trainer.is_global_zero and logging_step:
            now = time.monotonic()
            if step == total or now - self._last_line >= self.line_every_s:
                self._last_line = now
                log.info("step %d/%d (%.0f%%) %s", step, total, 100 * step / max(1, total), self._rate(step, now, trainer, pl_module))

    def _rate(self, step: int, now: float, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        shown = ", ".join(f"{name} {value}" for name, value in self.get_metrics(trainer, pl_module).items())
        began, first = self._start
        if step > first and now > began:
            per_s = (step - first) / (now - began)
            hours, seconds = divmod(round((trainer.max_steps - step) / per_s), 3600)
            shown += f"{', ' if shown else ''}{per_s:.3g} steps/s, {hours}:{seconds // 60:02d}:{seconds % 60:02d} left"
        return shown
