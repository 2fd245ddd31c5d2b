"""Lightning side of `vistok probe`: train an :class:`~vistok.tokenizers.ar.ARProbe` on token sequences.

:class:`ProbeModule` owns the AR model (built from the ``probe`` config group) and its optimizer;
:class:`TokenDataModule` serves in-memory token tensors (read from the token cache's shards). The
trainer, logger and checkpoints come from :mod:`vistok.tokenizers.training.run`, as for tokenizers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import SumMetric

from vistok.tokenizers.ar import ARProbe
from vistok.tokenizers.training.module import warmup_cosine

LN2 = math.log(2)


class ProbeModule(pl.LightningModule):
    """Next-token training of the AR probe.

    Args:
        model: the ``probe`` group (``_target_`` and ARProbe settings), plain mapping.
        codebook_size, seq_len, num_classes: of the probed tokens (num_classes 0: unconditional).
        optim: the ``optim`` block of configs/probe_train.yaml; max_steps: the schedule's length.
        class_dropout: share of labels replaced by "no class" in training (conditional probes).

    Batches are ``(tokens (B, L) long, labels (B,) long)``; labels are ignored when unconditional.
    Logs ``train/bits_per_token`` and ``val/bits_per_token`` (exact over the validation set, DDP-summed).
    """

    def __init__(self, model: Mapping[str, Any], codebook_size: int, seq_len: int, num_classes: int,
                 optim: Mapping[str, Any], max_steps: int, class_dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        from vistok.tokenizers.training.run import instantiate_config

        self.model: ARProbe = instantiate_config(dict(model), "probe", codebook_size=codebook_size, seq_len=seq_len,
                                                 num_classes=num_classes)
        self.optim = dict(optim)
        # set by vistok.eval.probe.train_probe: the last step trained, and the step of the weights it evaluates
        self.final_step = self.selected_step = 0
        self.val_nll = SumMetric()
        self.val_count = SumMetric()

    def _labels(self, labels: Tensor) -> Tensor | None:
        return labels if self.model.num_classes else None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        labels = self._labels(labels)
        if labels is not None and self.hparams.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.class_dropout
            labels = labels.masked_fill(drop, self.model.num_classes)
        loss = self.model.nll(tokens, labels).mean()
        self.log("train/bits_per_token", loss.detach() / LN2, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        tokens, labels = batch
        nll = self.model.nll(tokens, self._labels(labels))
        self.val_nll.update(nll.double().sum())
        self.val_count.update(torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device))

    def on_validation_epoch_end(self) -> None:
        bits = self.val_nll.compute() / self.val_count.compute() / LN2
        self.log("val/bits_per_token", bits.float(), prog_bar=True, sync_dist=False)  # already summed across ranks
        self.val_nll.reset()
        self.val_count.reset()

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        if self.optim.get("grad_clip", 0):
            self.clip_gradients(optimizer, gradient_clip_val=float(self.optim["grad_clip"]), gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(self.optim["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(self.optim["lr"]), betas=tuple(self.optim["betas"]))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(int(self.optim["warmup_steps"]), int(self.hparams.max_steps), float(self.optim["min_lr_ratio"])))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TokenDataModule(pl.LightningDataModule):
    """Token sequences held in memory: (N, L) long tokens and (N,) long labels per split.

    Training batches are shuffled with a seeded generator (Lightning adds the distributed sampler
    under DDP); the data repeats until ``trainer.max_steps``.
    """

    def __init__(self, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.train_set = TensorDataset(*train)
        self.val_set = TensorDataset(*val)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size * 2)
