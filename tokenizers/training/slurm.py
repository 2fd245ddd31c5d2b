"""Training under SLURM: Lightning's SLURM environment, and checkpoint-then-requeue on SLURM's warning signal.

Under ``srun`` (SLURM_NTASKS set, job name not ``bash``/``interactive``) Lightning's
:class:`~lightning.fabric.plugins.environments.SLURMEnvironment` supplies the ranks, the world size and
the rendezvous address from SLURM's variables; each task is one DDP process.

SLURM warns a job before its time limit (``#SBATCH --signal=SIGUSR1@90``, sent to every task). Lightning's
own answer, ``SLURMEnvironment(auto_requeue=True)``, saves ``hpc_ckpt_<n>.ckpt`` and runs
``scontrol requeue`` *inside the signal handler*, i.e. wherever the main thread happens to be: in the
middle of a backward pass, or with one rank inside a collective. Under DDP one rank then enters the
checkpoint's barrier while another waits in the step's all-reduce/broadcast, and the job hangs until
SLURM kills it, without a requeue (Lightning issue #21406, still so in Lightning 2.6; reproduced with two
gloo ranks here). :class:`SlurmRequeue` does the same work at a step boundary instead
(:mod:`~vistok.tokenizers.training.signals`): the handler only records the signal; after a training step the ranks agree (one all-reduce) that it arrived, all of them
save the checkpoint through ``trainer.save_checkpoint`` (the checkpoint IO of the run, so the file is
written atomically), rank 0 requeues the job, and every rank leaves training. So
:func:`slurm_support` gives the trainer ``SLURMEnvironment(auto_requeue=False)`` plus this callback.

The requeued job starts again with the same job id; ``resume=auto`` picks the newest checkpoint in the
run directory, which is this ``hpc_ckpt_<n>.ckpt`` (the name Lightning's ``ckpt_path="hpc"`` also finds).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

from vistok.tokenizers.training.signals import SignalAtStepBoundary

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1
_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class Requeued(SystemExit):
    """Ends the process after the checkpoint was saved and the job requeued.

    A SystemExit, so nothing above treats it as a failure to report: Hydra passes it through, and
    submitit writes no result for the job, which is right, since the requeued job will.
    """

    def __init__(self) -> None:
        super().__init__(0)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array element, else SLURM_JOB_ID."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def next_hpc_checkpoint(folder: str | Path) -> Path:
    """``folder/hpc_ckpt_<n+1>.ckpt`` after the highest existing ``hpc_ckpt_<n>.ckpt`` (temporary files ignored)."""
    folder = Path(folder)
    numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else [])
               if (m := _HPC_NAME.match(p.name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SlurmRequeue(SignalAtStepBoundary):
    """On SLURM's warning signal: save ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, requeue the job, stop.

    Args:
        signum: the signal SLURM is asked to send (``--signal=SIGUSR1@90``).
        check_every_n_steps: with several ranks, how often they compare notes (one all-reduce of a scalar
            and a host sync); a single process checks every step for free. At 90 s of warning even a
            slow step of a few seconds leaves ample margin at the default.
    """

    def __init__(self, signum: int = REQUEUE_SIGNAL, check_every_n_steps: int = 10) -> None:
        super().__init__((signum,), check_every_n_steps)
        self.signum = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # One line per rank in the job's log: what SLURM gave this process and what the signal will do.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        log.info("SLURM job %s: global rank %d of world size %d (node %d, local rank %d), cluster environment %s; "
                 "on %s: checkpoint %s, requeue", slurm_job_id(), trainer.global_rank, trainer.world_size,
                 trainer.node_rank, trainer.local_rank, type(environment).__name__ if environment else "none (one process)",
                 signal.Signals(self.signum).name, next_hpc_checkpoint(trainer.default_root_dir).name)

    def act(self, trainer: pl.Trainer, signum: int) -> None:
        self._checkpoint_and_requeue(trainer)

    def _checkpoint_and_requeue(self, trainer: pl.Trainer) -> None:
        path = next_hpc_checkpoint(trainer.default_root_dir)
        if trainer.is_global_zero:
            log.info("SLURM signal %s: saving %s at step %d", signal.Signals(self.signum).name, path, trainer.global_step)
        trainer.save_checkpoint(str(path), weights_only=False)  # every rank: it ends in a barrier
        requeued = self._requeue() if trainer.is_global_zero else False
        requeued = trainer.strategy.broadcast(requeued, src=0)
        if requeued:
            raise Requeued()
        # Not requeued: keep training until the time limit; the checkpoint stays for a manual resume.

    @staticmethod
    def _requeue() -> bool:
        job = slurm_job_id()
        if job is None:
            log.warning("SLURM signal received but SLURM_JOB_ID is not set; not requeuing, training continues.")
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("scontrol requeue %s failed (%s); training continues until the time limit.", job, error)
            return False
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed with status %d: %s; training continues until the time limit.",
                        job, result.returncode, (result.stderr or result.stdout).strip())
            return False
        log.info("requeued SLURM job %s; this attempt ends here and the next one resumes from the checkpoint.", job)
        return True


def slurm_support() -> tuple[list[Any], list[pl.Callback]]:
    """Trainer plugins and callbacks for a run under srun; two empty lists elsewhere."""
    if not SLURMEnvironment.detect():
        return [], []
    return [SLURMEnvironment(auto_requeue=False)], [SlurmRequeue()]
