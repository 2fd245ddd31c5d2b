"""SLURM support, tested without a cluster.

What runs for real: slurm/train.sbatch (bash), train.py, Lightning's DDP on CPU with gloo, Lightning's
SLURMEnvironment with vistok's checkpoint-and-requeue on SIGUSR1 (tokenizers/training/slurm.py), and (when the
optional `slurm` extra is installed) hydra-submitit-launcher and submitit. What is emulated: SLURM's own commands. Small stand-ins for
`sbatch`, `srun`, `scontrol` and `sacct` (the "fake SLURM" at the bottom of this file, run as
`python tests/test_slurm.py --fake-slurm CMD ...`) are put first on PATH:

- sbatch reads the script's #SBATCH lines, sets the variables SLURM sets for a batch job
  (SLURM_JOB_ID, SLURM_NNODES, SLURM_NTASKS, SLURM_NTASKS_PER_NODE, SLURM_JOB_NODELIST, ...; one job
  per element of an --array) and runs the script in the background, like slurmctld would;
- srun starts SLURM_NTASKS copies of its command on this machine with SLURM_PROCID / SLURM_LOCALID /
  SLURM_NODEID set, and --label / --output as srun does;
- scontrol resolves `show hostnames` and records `requeue JOB` instead of talking to slurmctld; like
  SLURM, a requeue then terminates the running job (SIGTERM to all of its processes, SIGKILL after a
  grace period) and starts the batch script again with the same job id and SLURM_RESTART_COUNT + 1;
- sacct reports the emulated jobs' states (submitit polls it).
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "slurm" / "train.sbatch"
LAUNCHER_CONFIG = ROOT / "configs" / "hydra" / "launcher" / "slurm.yaml"
FAKE_COMMANDS = ("sbatch", "srun", "scontrol", "sacct")
# A small run: the tiny 1D model (0.2 M parameters) at 16 px, batches of 4, one validation batch at the
# end; metrics flushed every step so that a test can watch training progress from outside.
TINY = ["trainer.accelerator=cpu", "trainer.precision=32-true", "model.image_size=16", "data.batch_size=4",
        "data.val_batch_size=4", "validation.grid_images=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "++logger.flush_logs_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]
TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------------
# Helpers


def _free_job_id(span: int = 2) -> int:
    """A job id whose rendezvous ports (20000 + id % 20000, for `span` consecutive ids) are free now.

    Other test runs may share this machine; a seeded RNG would hand all of them the same id.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        job = rng.randint(10000, 19998)
        try:
            for offset in range(span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 20000 + job + offset))
        except OSError:
            continue
        return job
    raise RuntimeError("no free port in 30000-39999 for the rendezvous")


def _fake_cluster(tmp: Path) -> dict[str, str]:
    """Environment of a login node of the emulated cluster: the fake commands first on PATH and none of
    the SLURM/rendezvous variables of whatever shell runs the tests."""
    bin_dir, state = tmp / "bin", tmp / "slurm-state"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    for name in FAKE_COMMANDS:
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --fake-slurm {name} "$@"\n')
        shim.chmod(0o755)
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("SLURM_", "SUBMITIT_", "VISTOK_RUN"))
                 and k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                               "VISTOK_MASTER_PORT")}
    return {**inherited, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "FAKE_SLURM_DIR": str(state), "FAKE_SLURM_FIRST_ID": str(_free_job_id()), "FAKE_SLURM_KILL_WAIT": "30",
            "PYTHON": sys.executable, "VISTOK_RUNS": str(tmp / "runs"), "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _state(env: dict[str, str]) -> Path:
    return Path(env["FAKE_SLURM_DIR"])


def _calls(env: dict[str, str]) -> list[str]:
    log = _state(env) / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _task_pids(env: dict[str, str], key: str) -> list[int]:
    tasks = _state(env) / "tasks"
    lines = tasks.read_text().split("\n") if tasks.exists() else []
    return [int(line.split()[2]) for line in lines if line.split()[:1] == [key]]


def _signal_tasks(env: dict[str, str], key: str, sig: int) -> None:
    """What `#SBATCH --signal=SIGUSR1@90` does: the signal to every task of the job, not the batch shell."""
    pids = _task_pids(env, key)
    assert pids, f"no task of job {key} was started"
    for pid in pids:
        os.kill(pid, sig)


def _stop_cluster(env: dict[str, str]) -> None:
    """Kill what the emulated cluster still runs for this test (its slurmctld stand-ins and job process groups)."""
    for record in (_state(env) / "jobs").glob("*.runner") if (_state(env) / "jobs").is_dir() else []:
        for group_file in (record, record.with_suffix(".pgid")):
            if group_file.exists():
                try:
                    os.killpg(int(group_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, PermissionError, ValueError):
                    pass


def _logged_steps(metrics_csv: Path) -> list[int]:
    """The `step` column of a CSVLogger metrics file (empty while the file does not exist)."""
    if not metrics_csv.exists():
        return []
    with open(metrics_csv, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]


def _wait_for(condition, what: str, log: Path | None, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{tail}")


def _checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _generator_adam_steps(ckpt: dict) -> float:
    """Adam's own step count in the generator optimizer's state (first parameter)."""
    state = ckpt["optimizer_states"][0]["state"]
    return float(next(iter(state.values()))["step"])


def _attempt_logs(job_log: str) -> list[str]:
    """The job's output split at the batch script's '[vistok] job ..., attempt N' lines."""
    parts = re.split(r"^\[vistok\] job \S+, attempt \d+:.*$", job_log, flags=re.M)
    return parts[1:]


# ------------------------------------------------------------------------------------------------
# The scripts: syntax, lint, and what the sbatch script does with SLURM's environment


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck is not installed (the dev extra installs it: pip install -e '.[dev]')")
    return found


def test_sbatch_script_is_valid_bash_and_lint_clean():
    subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], check=True)
    lint = subprocess.run([_shellcheck(), "--shell=bash", str(SBATCH_SCRIPT)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_launcher_setup_lines_are_lint_clean(tmp_path):
    from omegaconf import OmegaConf

    setup = OmegaConf.load(LAUNCHER_CONFIG).setup
    script = tmp_path / "setup.sh"
    script.write_text("#!/bin/bash\n" + "\n".join(setup) + "\n")
    subprocess.run(["bash", "-n", str(script)], check=True)
    lint = subprocess.run([_shellcheck(), str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _batch_env(tmp_path: Path, **slurm: str) -> dict[str, str]:
    """What sbatch sets for the batch script of a job (before srun starts the tasks)."""
    env = _fake_cluster(tmp_path)
    env.update({"SLURM_JOB_ID": env["FAKE_SLURM_FIRST_ID"], "SLURM_JOB_NAME": "vistok", "SLURM_SUBMIT_DIR": str(ROOT),
                "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_NNODES": "1",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"})
    env.update(slurm)
    return {k: v for k, v in env.items() if v is not None}


def test_sbatch_runs_one_task_per_gpu_with_the_run_directory_pinned(tmp_path):
    """2 nodes x 4 GPUs: srun starts 8 tasks of train.py, all with the same arguments and run directory."""
    recorder = tmp_path / "record-task"
    recorder.write_text('#!/bin/sh\nenv > "$RECORD_DIR/rank$SLURM_PROCID.env"\n'
                        'printf "%s\\n" "$@" > "$RECORD_DIR/rank$SLURM_PROCID.args"\n')
    recorder.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    env = _batch_env(tmp_path, SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="8",
                     SLURM_NTASKS_PER_NODE="4", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="gpu017,gpu018",
                     SLURM_RESTART_COUNT="2", PYTHON=str(recorder), RECORD_DIR=str(records),
                     MASTER_ADDR="stale-login-node")
    job = env["SLURM_JOB_ID"]
    done = subprocess.run(["bash", str(SBATCH_SCRIPT), "experiment=demo", "trainer.max_steps=7"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / f"vistok-{job}"
    assert f"[vistok] job {job}, attempt 3: 2 node(s) x 4 task(s)" in done.stdout
    assert run_dir.is_dir()
    for rank in range(8):
        args = (records / f"rank{rank}.args").read_text().splitlines()
        task_env = dict(line.split("=", 1) for line in (records / f"rank{rank}.env").read_text().splitlines()
                        if "=" in line)
        assert args == ["train.py", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4",
                        f"run_dir='{run_dir}'", "resume=auto", "experiment=demo", "trainer.max_steps=7"]
        assert (task_env["SLURM_PROCID"], task_env["SLURM_NODEID"], task_env["SLURM_LOCALID"]) == (
            str(rank), str(rank // 4), str(rank % 4))
        # the first node of the allocation, not a MASTER_ADDR inherited from the submitting shell
        assert task_env["MASTER_ADDR"] == "gpu017"
        assert task_env["MASTER_PORT"] == str(20000 + int(job) % 20000)
        assert task_env["OMP_NUM_THREADS"] == "1"


def test_sbatch_run_directory_of_an_array_element_and_an_explicit_one(tmp_path):
    recorder = tmp_path / "record-task"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD_DIR/args"\n')
    recorder.chmod(0o755)
    project = tmp_path / "project"  # VISTOK_ROOT: where train.py is, and what relative paths start from
    project.mkdir()
    (project / "train.py").touch()
    env = _batch_env(tmp_path, PYTHON=str(recorder), RECORD_DIR=str(tmp_path), SLURM_ARRAY_JOB_ID="5000",
                     SLURM_ARRAY_TASK_ID="3", VISTOK_ROOT=str(project))
    subprocess.run(["bash", str(SBATCH_SCRIPT)], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    assert f"run_dir='{tmp_path / 'runs' / 'vistok-5000_3'}'" in (tmp_path / "args").read_text().splitlines()

    env["VISTOK_RUN_DIR"] = "old-runs/vistok-4321"  # continue an earlier job's run in a new job
    subprocess.run(["bash", str(SBATCH_SCRIPT)], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    assert f"run_dir='{project / 'old-runs' / 'vistok-4321'}'" in (tmp_path / "args").read_text().splitlines()
    assert (project / "old-runs" / "vistok-4321").is_dir()

    # a key the user gives replaces the script's own (train.py refuses a key given twice)
    subprocess.run(["bash", str(SBATCH_SCRIPT), "resume=old.ckpt", "+trainer.devices=2"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[-2:] == ["resume=old.ckpt", "+trainer.devices=2"]
    assert not any(arg.startswith(("resume=", "trainer.devices=")) for arg in args[:-2]) and "trainer=ddp" in args


def test_sbatch_outside_a_checkout_runs_the_installed_vistok(tmp_path):
    """Submitted from a folder of one's own (no train.py there), the job runs `python -m vistok train`."""
    recorder = tmp_path / "record-task"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD_DIR/args"\n')
    recorder.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = _batch_env(tmp_path, PYTHON=str(recorder), RECORD_DIR=str(tmp_path), VISTOK_ROOT=str(work))
    subprocess.run(["bash", str(SBATCH_SCRIPT), "experiment=demo"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:4] == ["-m", "vistok", "train", "trainer=ddp"] and args[-1] == "experiment=demo"
    assert any(arg.startswith("run_dir='/") for arg in args)


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_ID": None}, "not inside a SLURM job; submit this script with sbatch"),
    ({"SLURM_NTASKS_PER_NODE": None}, "submit with --ntasks-per-node=G (one task per GPU)"),
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}, "--ntasks-per-node=2 but 8 GPU(s) per node"),
    ({"VISTOK_RUN_DIR": "/tmp/it's"}, "may not contain quotes or backslashes"),
])
def test_sbatch_refuses_a_wrong_allocation_with_one_sentence(tmp_path, change, message):
    env = _batch_env(tmp_path, **change)
    done = subprocess.run(["bash", str(SBATCH_SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("train.sbatch: error: ") and message in done.stderr
    assert "srun" not in "\n".join(_calls(env))


# ------------------------------------------------------------------------------------------------
# The training side of SLURM support (tokenizers/slurm.py)


def test_slurm_support_only_under_srun(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from vistok.tokenizers.training.slurm import SlurmRequeue, slurm_support

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert slurm_support() == ([], [])
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "vistok")
    plugins, callbacks = slurm_support()
    assert [type(p) for p in plugins] == [SLURMEnvironment] and plugins[0].auto_requeue is False
    assert [type(c) for c in callbacks] == [SlurmRequeue]
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc + srun --pty: not a batch job
    assert slurm_support() == ([], [])


def test_next_hpc_checkpoint_ignores_temporary_files(tmp_path):
    from vistok.tokenizers.training.slurm import next_hpc_checkpoint

    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt", ".hpc_ckpt_4.ckpt.x81k2.tmp", "last.ckpt"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


@pytest.mark.parametrize("scontrol_status", [0, 1])
def test_requeue_callback_in_one_process(tmp_path, monkeypatch, scontrol_status):
    """SIGUSR1 during step 3 -> hpc_ckpt_1.ckpt at step 3; requeued: the attempt ends (SystemExit 0);
    `scontrol requeue` refused: training goes on to max_steps and the checkpoint stays."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from vistok.tokenizers.training.slurm import Requeued, SlurmRequeue

    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit {scontrol_status}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    class SignalAtStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # inside the third step
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=6, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SignalAtStep(), SlurmRequeue()])
    before = signal.getsignal(signal.SIGUSR1)
    if scontrol_status == 0:
        with pytest.raises(Requeued) as stopped:
            trainer.fit(BoringModel())
        assert stopped.value.code == 0 and trainer.global_step == 3
    else:
        trainer.fit(BoringModel())
        assert trainer.global_step == 6
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored after fit
    assert calls.read_text().split("\n")[0] == "requeue 4242"
    assert _checkpoint(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 3
    assert not (tmp_path / "hpc_ckpt_2.ckpt").exists()


# ------------------------------------------------------------------------------------------------
# A 2-task DDP job on the emulated cluster, preempted once: srun -> train.py under Lightning's
# SLURMEnvironment on CPU/gloo; SIGUSR1 -> checkpoint + `scontrol requeue`; the requeued job resumes.

DDP_MAX_STEPS = 50


@pytest.fixture(scope="module")
def requeued_ddp_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-ddp")
    env = _fake_cluster(tmp)
    submit = subprocess.run(
        ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--job-name=vistok-test", f"--output={tmp}/%x-%j.out",
         str(SBATCH_SCRIPT), *TINY, f"trainer.max_steps={DDP_MAX_STEPS}", f"trainer.val_check_interval={DDP_MAX_STEPS}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60)
    job = submit.stdout.split()[-1]
    run_dir, log = tmp / "runs" / f"vistok-test-{job}", tmp / f"vistok-test-{job}.out"
    done = _state(env) / "jobs" / f"{job}.done"
    try:
        _wait_for(lambda: max(_logged_steps(run_dir / "logs" / "version_0" / "metrics.csv"), default=-1) >= 3,
                  "the first attempt to train 3 steps", log)
        assert not done.exists(), "the job finished before it could be signalled"
        _signal_tasks(env, job, signal.SIGUSR1)
        _wait_for(done.exists, "the job to end", log)
    finally:
        _stop_cluster(env)
    return {"job": job, "run_dir": run_dir, "log": log.read_text(), "calls": _calls(env),
            "done": json.loads(done.read_text())}


def test_two_task_job_runs_ddp_under_slurm_environment(requeued_ddp_job):
    first_attempt = _attempt_logs(requeued_ddp_job["log"])[0]
    for rank in (0, 1):
        # one line per task from the SLURM callback: what Lightning made of SLURM's variables
        assert re.search(rf"^{rank}: .*SLURM job {requeued_ddp_job['job']}: global rank {rank} of world size 2 "
                         rf"\(node 0, local rank {rank}\), cluster environment SLURMEnvironment", first_attempt, re.M)
        # Lightning's own line; whether it carries a logging prefix depends on the logging set-up
        assert re.search(rf"^{rank}: .*Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2",
                         first_attempt, re.M)
    assert "distributed_backend=gloo" in first_attempt
    steps = _logged_steps(requeued_ddp_job["run_dir"] / "logs" / "version_0" / "metrics.csv")
    assert steps and min(steps) == 0 and max(steps) >= 3


def test_sigusr1_saves_a_checkpoint_and_requeues_the_job(requeued_ddp_job):
    job, run_dir = requeued_ddp_job["job"], requeued_ddp_job["run_dir"]
    assert [c for c in requeued_ddp_job["calls"] if c.startswith("scontrol requeue")] == [f"scontrol requeue {job}"]
    hpc = _checkpoint(run_dir / "hpc_ckpt_1.ckpt")
    saved = hpc["global_step"]
    assert 3 <= saved < DDP_MAX_STEPS and hpc["vistok"]["step"] == saved
    assert _generator_adam_steps(hpc) == saved
    # the first attempt stopped right there: nothing logged at or after the checkpoint's step
    assert saved - 3 <= max(_logged_steps(run_dir / "logs" / "version_0" / "metrics.csv")) < saved
    assert not list(run_dir.glob(".*.tmp")), "a checkpoint write was left half-done"


def test_requeued_job_resumes_from_the_checkpoint_at_its_step(requeued_ddp_job):
    run_dir = requeued_ddp_job["run_dir"]
    assert requeued_ddp_job["done"] == {"exit": 0, "attempts": 2}
    saved = _checkpoint(run_dir / "hpc_ckpt_1.ckpt")["global_step"]
    second_attempt = _attempt_logs(requeued_ddp_job["log"])[1]
    for rank in (0, 1):
        assert re.search(rf"^{rank}: .*resuming from {re.escape(str(run_dir / 'hpc_ckpt_1.ckpt'))} at step \d+$", second_attempt, re.M)
    resumed_steps = _logged_steps(run_dir / "logs" / "version_1" / "metrics.csv")
    assert min(resumed_steps) == saved and max(resumed_steps) == DDP_MAX_STEPS - 1
    final = _checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == DDP_MAX_STEPS
    assert _generator_adam_steps(final) == DDP_MAX_STEPS  # optimizer state carried over, not restarted
    assert json.loads((run_dir / "rank_consistency.json").read_text())["differing"] == []


# ------------------------------------------------------------------------------------------------
# hydra-submitit-launcher: a 2-job sweep submitted as a SLURM array; one element is signalled


SWEEP_MAX_STEPS = 30


def test_submitit_sweep_checkpoints_requeues_and_resumes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the optional `slurm` extra (hydra-submitit-launcher) is not installed")
    env = _fake_cluster(tmp_path)
    array_job = env["FAKE_SLURM_FIRST_ID"]
    sweep, log = tmp_path / "sweep", tmp_path / "launcher.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "train.py", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", "trainer=ddp",
             "trainer.devices=1", "trainer.num_nodes=1", *TINY, f"trainer.max_steps={SWEEP_MAX_STEPS}",
             f"trainer.val_check_interval={SWEEP_MAX_STEPS}", "resume=auto", "quantizer=fsq,lfq"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    task_log = sweep / ".submitit" / f"{array_job}_0" / f"{array_job}_0_0_log.out"
    try:
        _wait_for(lambda: max(_logged_steps(sweep / "0" / "logs" / "version_0" / "metrics.csv"), default=-1) >= 3,
                  "sweep job 0 to train 3 steps", task_log)
        _signal_tasks(env, f"{array_job}_0", signal.SIGUSR1)
        launcher.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the sweep did not finish in {TIMEOUT_S} s; launcher log:\n{log.read_text()[-4000:]}")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        _stop_cluster(env)
    assert launcher.returncode == 0, log.read_text()[-4000:]

    # What submitit asked SLURM for, from configs/hydra/launcher/slurm.yaml and the trainer settings
    submission = (sweep / ".submitit" / array_job / f"{array_job}_submission.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=USR1@90",
                 "#SBATCH --job-name=vistok-train"):
        assert line in submission.splitlines()
    assert "USR2" not in submission  # submitit's own signal is not requested: Lightning's side requeues

    # Job 0 was signalled: checkpoint, requeue of *its array element*, second attempt resumed from it
    assert [c for c in _calls(env) if c.startswith("scontrol requeue")] == [f"scontrol requeue {array_job}_0"]
    saved = _checkpoint(sweep / "0" / "hpc_ckpt_1.ckpt")["global_step"]
    assert 3 <= saved < SWEEP_MAX_STEPS
    assert min(_logged_steps(sweep / "0" / "logs" / "version_1" / "metrics.csv")) == saved
    text = task_log.read_text()
    # submitit's own log lines: the first attempt ended without a result (the launcher kept waiting),
    # the second one completed
    events = re.findall(r"^submitit INFO \(.*?\) - (Starting with|Job completed successfully)", text, re.M)
    assert events == ["Starting with", "Starting with", "Job completed successfully"]
    assert f"resuming from {sweep / '0' / 'hpc_ckpt_1.ckpt'}" in text
    # Job 1 ran once, undisturbed
    assert not list((sweep / "1").glob("hpc_ckpt_*.ckpt"))
    assert not (sweep / "1" / "logs" / "version_1").exists()
    for job in ("0", "1"):
        assert _checkpoint(sweep / job / "checkpoints" / "last.ckpt")["global_step"] == SWEEP_MAX_STEPS
    quantizers = [_checkpoint(sweep / job / "checkpoints" / "last.ckpt")["hyper_parameters"]["tokenizer"]["quantizer"]["_target_"]
                  for job in ("0", "1")]
    assert quantizers == ["vistok.tokenizers.quantizers.FSQ", "vistok.tokenizers.quantizers.LFQ"]


# ================================================================================================
# Fake SLURM: the stand-ins for SLURM's commands. Only the standard library: they start quickly.
# State lives in $FAKE_SLURM_DIR:
#   calls.log                 one line per command call ("scontrol requeue 7001")
#   next_id                   the job id counter
#   jobs/<key>.json           the job: script copy, arguments, environment, output file
#   jobs/<key>.runner         pid of the process playing slurmctld for this job
#   jobs/<key>.pgid           process group of the running attempt (batch script, srun, tasks)
#   jobs/<key>.requeue        set by `scontrol requeue`, consumed when the attempt has ended
#   jobs/<key>.done           {"exit": code, "attempts": n} once the job has finished
#   tasks                     "<key> <rank> <pid>" for every task srun started
# <key> is the job id, or <array job id>_<array task id> for an element of an array.
# ================================================================================================

_SRUN_VALUE_OPTIONS = {"--output", "-o", "--error", "-e", "--ntasks", "-n", "--nodes", "-N", "--job-name", "-J",
                       "--cpus-per-task", "-c", "--open-mode"}


def _state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _log_call(argv: list[str]) -> None:
    with open(_state_dir() / "calls.log", "a") as f:
        f.write(" ".join(argv) + "\n")


def _job_key(env: dict[str, str] | os._Environ) -> str:
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def _expand_pattern(pattern: str, env: dict[str, str] | os._Environ, task: int | None = None) -> str:
    """srun/sbatch file name patterns: %j %A %a %x %t %N %%."""
    values = {"j": env.get("SLURM_JOB_ID", ""), "A": env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "")),
              "a": env.get("SLURM_ARRAY_TASK_ID", "0"), "x": env.get("SLURM_JOB_NAME", ""),
              "t": "" if task is None else str(task), "N": "localhost", "%": "%"}
    return re.sub(r"%([jAaxtN%])", lambda m: values[m.group(1)], pattern)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fake_sbatch(args: list[str]) -> int:
    cli: dict[str, str] = {}
    parsable = False
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option == "--parsable":
            parsable = True
        else:
            key, _, value = option.lstrip("-").partition("=")
            cli[key] = value or "1"
    script, script_args = Path(args[0]).resolve(), args[1:]
    options: dict[str, str] = {}
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            key, _, value = line.split()[1].lstrip("-").partition("=")
            options[key] = value or "1"
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops reading options at the first command
    options.update(cli)

    state = _state_dir()
    (state / "jobs").mkdir(parents=True, exist_ok=True)
    counter = state / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else int(os.environ.get("FAKE_SLURM_FIRST_ID", "7001"))
    array = options.get("array")
    elements = [None] if array is None else list(range(*(lambda a, b: (a, b + 1))(
        *map(int, array.split("%")[0].split("-")))))
    counter.write_text(str(job_id + len(elements)))
    nodes, per_node = int(options.get("nodes", "1")), int(options.get("ntasks-per-node", "1"))
    name = options.get("job-name", script.name)
    for offset, element in enumerate(elements):
        env = dict(os.environ)
        env.update({"SLURM_JOB_ID": str(job_id + offset), "SLURM_JOB_NAME": name, "SLURM_NNODES": str(nodes),
                    "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
                    "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_JOB_NODELIST": "localhost",
                    "SLURM_NODELIST": "localhost", "SLURM_SUBMIT_DIR": os.getcwd(),
                    "SLURM_CPUS_PER_TASK": options.get("cpus-per-task", "1"), "SLURM_CLUSTER_NAME": "fake"})
        if element is not None:
            env.update({"SLURM_ARRAY_JOB_ID": str(job_id), "SLURM_ARRAY_TASK_ID": str(element)})
        key = _job_key(env)
        copy = state / "jobs" / f"{key}.sh"  # sbatch keeps its own copy: submitters may delete theirs
        shutil.copyfile(script, copy)
        output = Path(os.getcwd()) / _expand_pattern(options.get("output", "slurm-%j.out"), env)
        record = {"script": str(copy), "args": script_args, "env": env, "cwd": os.getcwd(), "output": str(output),
                  "options": options}
        (state / "jobs" / f"{key}.json").write_text(json.dumps(record))
        runner = subprocess.Popen([sys.executable, __file__, "--fake-slurm", "_run_job", key], start_new_session=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (state / "jobs" / f"{key}.runner").write_text(str(runner.pid))
    print(job_id if parsable else f"Submitted batch job {job_id}")
    return 0


def _run_job(key: str) -> int:
    """slurmctld's part: run the batch script, again after each requeue, then record the outcome."""
    jobs = _state_dir() / "jobs"
    record = json.loads((jobs / f"{key}.json").read_text())
    attempt = 0
    while True:
        env = dict(record["env"])
        if attempt:
            env["SLURM_RESTART_COUNT"] = str(attempt)
        with open(record["output"], "ab") as out:
            batch = subprocess.Popen(["bash", record["script"], *record["args"]], cwd=record["cwd"], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        (jobs / f"{key}.pgid").write_text(str(batch.pid))
        code = batch.wait()
        deadline = time.monotonic() + 120
        while _group_alive(batch.pid) and time.monotonic() < deadline:  # the job ends when all its processes do
            time.sleep(0.1)
        if _group_alive(batch.pid):
            os.killpg(batch.pid, signal.SIGKILL)
        requeue = jobs / f"{key}.requeue"
        if not requeue.exists():
            break
        requeue.unlink()
        attempt += 1
    (jobs / f"{key}.done").write_text(json.dumps({"exit": code, "attempts": attempt + 1}))
    return 0


def _kill_job(key: str) -> int:
    """What SLURM does to a running job it requeues: SIGCONT + SIGTERM to every process, SIGKILL later."""
    pgid = int((_state_dir() / "jobs" / f"{key}.pgid").read_text())
    time.sleep(0.2)
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return 0
    deadline = time.monotonic() + float(os.environ.get("FAKE_SLURM_KILL_WAIT", "30"))
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    return 0


def _fake_scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(args[2].split(",")))
        return 0
    if args and args[0] == "requeue":
        key = args[1]
        jobs = _state_dir() / "jobs"
        if not (jobs / f"{key}.json").exists():
            print(f"scontrol: error: Invalid job id specified: {key}", file=sys.stderr)
            return 1
        (jobs / f"{key}.requeue").touch()
        subprocess.Popen([sys.executable, __file__, "--fake-slurm", "_kill_job", key], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return 0
    print(f"fake scontrol: unsupported: {' '.join(args)}", file=sys.stderr)
    return 1


def _fake_sacct(args: list[str]) -> int:
    print("JobID|State|NodeList")
    for record in sorted((_state_dir() / "jobs").glob("*.json")):
        key = record.stem
        done = record.with_suffix(".done")
        state = "RUNNING"
        if done.exists():
            state = "COMPLETED" if json.loads(done.read_text())["exit"] == 0 else "FAILED"
        print(f"{key}|{state}|localhost")
    return 0


def _fake_srun(args: list[str]) -> int:
    label, patterns = False, {}
    while args and args[0].startswith("-"):
        option = args.pop(0)
        name, has_value, value = option.partition("=")
        if name in ("--label", "-l"):
            label = True
        elif name in _SRUN_VALUE_OPTIONS and not has_value:
            value = args.pop(0)
        if name in ("--output", "-o", "--error", "-e"):
            patterns["out" if name in ("--output", "-o") else "err"] = value
    ntasks = int(os.environ["SLURM_NTASKS"])
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", ntasks))
    key = _job_key(os.environ)
    # srun survives the signals SLURM sends to the whole job and waits for its tasks, which get them
    # directly; a Python handler (not SIG_IGN) so that the tasks start with default dispositions.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT):
        signal.signal(sig, lambda *_: None)

    tasks, pumps = [], []
    for rank in range(ntasks):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                   SLURM_NODEID=str(rank // per_node), SLURM_STEP_ID="0", SLURM_STEPID="0",
                   SLURM_STEP_NUM_TASKS=str(ntasks))
        files = {k: open(_expand_pattern(p, os.environ, rank), "ab") for k, p in patterns.items()}
        stdout = files.get("out", subprocess.PIPE)
        stderr = files.get("err", subprocess.STDOUT if "out" not in files else files["out"])
        proc = subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr)
        tasks.append(proc)
        with open(_state_dir() / "tasks", "a") as f:
            f.write(f"{key} {rank} {proc.pid}\n")
        if proc.stdout is not None:
            prefix = f"{rank}: ".encode() if label else b""
            pump = threading.Thread(target=_pump, args=(proc.stdout, prefix), daemon=True)
            pump.start()
            pumps.append(pump)
    codes: list[int | None] = [None] * ntasks
    while any(code is None for code in codes):
        for rank, proc in enumerate(tasks):
            if codes[rank] is None:
                codes[rank] = proc.poll()
                if codes[rank]:  # --kill-on-bad-exit
                    for other in tasks:
                        if other.poll() is None:
                            other.kill()
        time.sleep(0.05)
    for pump in pumps:
        pump.join(timeout=5)
    failed = [code for code in codes if code]
    return 0 if not failed else (128 - failed[0] if failed[0] < 0 else failed[0])


def _pump(stream, prefix: bytes) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        out.write(prefix + line)
        out.flush()


def _fake_slurm_main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if not command.startswith("_"):
        _log_call([command, *args])
    handlers = {"sbatch": _fake_sbatch, "srun": _fake_srun, "scontrol": _fake_scontrol, "sacct": _fake_sacct,
                "_run_job": lambda a: _run_job(a[0]), "_kill_job": lambda a: _kill_job(a[0])}
    return handlers[command](args)


if __name__ == "__main__" and sys.argv[1:2] == ["--fake-slurm"]:
    sys.exit(_fake_slurm_main(sys.argv[2:]))
