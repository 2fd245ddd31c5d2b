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
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.loggers import WandbLogger

from vistok.tokenizers.atomic import atomic_write, atomic_write_json


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
        atomic_write_json(self.run_dir / "metrics.json", {"step": step, "metrics": dict(pl_module.last_val_metrics)})


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
