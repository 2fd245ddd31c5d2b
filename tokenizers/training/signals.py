"""Signals that end a training run: act on them at a step boundary, never inside the step.

A Python signal handler runs between two bytecodes wherever the main thread is: inside a backward
pass, inside ``torch.save``, or with one DDP rank in a collective. So the handlers here only
record the signal; after the next training step the ranks agree (one all-reduce) that one
arrived, and then all of them act together. :class:`SignalAtStepBoundary` is that mechanism;

- :class:`StopOnSignal` (SIGINT, SIGTERM): save ``checkpoints/last.ckpt`` and stop with
  :class:`Interrupted`, which names the checkpoint; ``resume=auto`` continues from it. A second
  Ctrl-C while the first waits for the step to end stops at once (Python's KeyboardInterrupt).
- :class:`~vistok.tokenizers.training.slurm.SlurmRequeue` (SLURM's SIGUSR1): checkpoint and requeue.

Lightning's own SIGTERM handling only stops at the end of an epoch (after ``batches_per_epoch``
steps here) and saves nothing; Lightning's KeyboardInterrupt handling saves nothing either.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class SignalAtStepBoundary(pl.Callback):
    """Record ``signums`` when they arrive; call :meth:`act` after the next training step.

    Args:
        signums: the signals to handle (the first one received is the one acted on).
        check_every_n_steps: with several ranks, how often they compare notes (one all-reduce of a
            scalar and a host sync); a single process checks every step for free.
    """

    def __init__(self, signums: tuple[int, ...], check_every_n_steps: int = 10) -> None:
        if check_every_n_steps < 1:
            raise ValueError("check_every_n_steps must be >= 1")
        self.signums = tuple(signums)
        self.check_every_n_steps = check_every_n_steps
        self.received = 0  # the signal number, 0 for none
        self._previous: dict[int, Any] = {}

    # Installed when training starts: after Lightning's signal connector has taken its snapshot of the
    # handlers (its teardown then puts the previous one back, however fit ends), and before the training
    # and validation loaders fork their workers, which inherit it: the terminal and SLURM signal every
    # process of the job, and a worker must not die of the signal's default action.
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # fit ended by an exception (ours too): on_train_end is not called

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes anywhere in the step: only record it.
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step to end
        if not self.received:
            self.received = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self.received
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
                return
            flag = torch.tensor(float(signum), device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if not signum:
            return
        self.received = 0
        self.act(trainer, signum)

    def act(self, trainer: pl.Trainer, signum: int) -> None:
        """What every rank does at the step boundary after ``signum`` arrived (on any rank)."""
        raise NotImplementedError


class Interrupted(SystemExit):
    """Training stopped on SIGINT or SIGTERM after saving ``checkpoint``; exit status 128 + the signal.

    A SystemExit, so nothing above reports it as a failure with a traceback (Hydra passes it through).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path, run_dir: Path) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} at step {self.step}; saved {self.checkpoint}; "
                f"continue with resume=auto run_dir={self.run_dir}")


class StopOnSignal(SignalAtStepBoundary):
    """On SIGINT or SIGTERM: save ``<run_dir>/checkpoints/last.ckpt`` at the step boundary, then raise :class:`Interrupted`."""

    def __init__(self, run_dir: str | Path, check_every_n_steps: int = 10) -> None:
        super().__init__((signal.SIGINT, signal.SIGTERM), check_every_n_steps)
        self.run_dir = Path(run_dir)

    def act(self, trainer: pl.Trainer, signum: int) -> None:
        path = self.run_dir / "checkpoints" / "last.ckpt"
        if trainer.is_global_zero:
            log.info("%s: saving %s at step %d", signal.Signals(signum).name, path, trainer.global_step)
        trainer.save_checkpoint(str(path), weights_only=False)  # every rank: it ends in a barrier
        raise Interrupted(signum, trainer.global_step, path, self.run_dir)
