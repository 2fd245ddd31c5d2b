"""Train a tokenizer: ``vistok train [experiment=NAME] [group=option ...] [key=value ...]``.

In a checkout, ``python train.py ...`` is the same command. With no arguments it runs the CPU demo
(``experiment=demo``). The configuration is Hydra's, in the ``configs/`` folder that ships inside
the package (``configs/train.yaml`` lists the settings, README.md shows examples). Your own
option files (an ``experiment/my_run.yaml``, say) live in a folder of your own that Hydra adds to
its search path: ``vistok train --config-dir ~/my-configs experiment=my_run``. Bad settings stop
before training with one sentence on stderr and exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from vistok import hide_checkout
    except ModuleNotFoundError:
        print("train.py: error: vistok is not installed in this Python environment; install it first "
              "(pip install -e . in this folder, as README.md shows).", file=sys.stderr)
        raise SystemExit(2) from None
    # Python put this script's folder first on sys.path; in a checkout it holds tokenizers/, data/
    # and eval/, which must not hide Hugging Face's `tokenizers` (and others) from the imports below.
    hide_checkout(Path(__file__).resolve().parent)

import logging
from collections import Counter

import hydra
from omegaconf import DictConfig, OmegaConf

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.training.settings import CONFIG_DIR

# How this process was started: the command's name for error sentences (train.py or vistok train)
# and the original sys.argv, which Lightning's DDP launcher replays to start the other ranks.
_LAUNCH: dict = {"prog": "train.py", "argv": None}


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from lightning.pytorch.utilities import rank_zero_only

    from vistok.tokenizers.training.module import TrainingDiverged
    from vistok.tokenizers.training.run import list_checkpoints, run_training
    from vistok.tokenizers.training.signals import Interrupted

    prog = _LAUNCH["prog"]
    if _LAUNCH["argv"] is not None:
        sys.argv = _LAUNCH["argv"]  # Hydra has read its overrides; the ranks restart as this process did
    # Hydra already logs to the console and train.log; the `lightning` package's own console
    # handler would print every Lightning message a second time.
    lightning_logger = logging.getLogger("lightning")
    for handler in [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]:
        lightning_logger.removeHandler(handler)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_training(cfg, run_dir)
    except VistokError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        _remove_unstarted(run_dir)
        raise SystemExit(2) from None
    except Interrupted as stop:
        if rank_zero_only.rank == 0:
            print(f"{prog}: {stop}", file=sys.stderr)
        raise SystemExit(stop.code) from None
    except TrainingDiverged as error:
        kept = list_checkpoints(run_dir)
        where = f"the last good checkpoint is {kept[0]}" if kept else "no checkpoint had been written yet"
        print(f"{prog}: error: {error}; {where}.", file=sys.stderr)
        raise SystemExit(1) from None
    if result.table:
        print(result.table)
        _append_to_log_files(result.table)


# What Hydra writes into the run directory before the task starts.
_HYDRA_FILES = {".hydra", "train.log"}


def _remove_unstarted(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote before the configuration was refused.

    Then the empty folders above it that lie inside the current folder (outputs/<name>/) go too, so
    a refused start leaves nothing behind. A directory with anything else in it is left alone.
    """
    import shutil

    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= _HYDRA_FILES:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(handler.baseFilename).parent == run_dir:  # Hydra's train.log: a later message would recreate it
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def _append_to_log_files(text: str) -> None:
    """Write ``text`` as it is (no log prefix) into the files the root logger writes (Hydra's train.log)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            handler.acquire()
            try:
                handler.stream.write(text + "\n")
                handler.flush()
            finally:
                handler.release()


def compose_problem(argv: list[str]) -> str | None:
    """One sentence for command-line arguments Hydra would refuse, or None.

    Hydra reports a missing group option (quantizer=nope), a key that is not in the config or a
    malformed override with several lines, a hint about HYDRA_FULL_ERROR and exit status 1;
    composing the config here first keeps the project's rule (one sentence, exit status 2).
    ``--config-dir DIR`` (``-cd``) adds a folder of the user's own option files to the search
    path, as Hydra does. Runs with Hydra's other flags (-m, --cfg, --help, ...) and sweeps are
    left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    overrides, config_dirs = [], []
    args = iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd"):
            config_dirs.append(next(args, ""))
        elif arg.startswith("--config-dir="):
            config_dirs.append(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    for folder in config_dirs:
        if not Path(folder).expanduser().is_dir():
            return f"--config-dir {folder or '(empty)'} is not a folder; pass the folder that holds your own option files (e.g. experiment/my_run.yaml)."
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        return _one_sentence(error)
    if any(override.is_sweep_override() for override in parsed):
        return None
    counts = Counter(override.key_or_group for override in parsed)
    for key, count in counts.items():
        if count > 1:
            return (f"{key} is given {count} times on the command line (the shell expands an unquoted {{a..b}} or {{a,b}} "
                    f"pattern into one argument per value, and only the last would be used); give it once, quoting a "
                    f"pattern so the shell leaves it alone: '{key}=/data/shard-{{000000..000003}}.tar'.")
    if config_dirs:
        if any(override.key_or_group == "hydra.searchpath" for override in parsed):
            return None  # both ways of extending the search path at once: Hydra merges them itself
        paths = ",".join(f"file://{Path(folder).expanduser().resolve()}" for folder in config_dirs)
        overrides = [*overrides, f"hydra.searchpath=[{paths}]"]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except MissingConfigException as error:
        group, _, choice = str(error.missing_cfg_file or "").rpartition("/")
        if group and error.options is not None:
            where = f"configs/{group}/" + (" or your --config-dir" if config_dirs else "")
            return f"unknown {group} '{choice}'; choose one of {', '.join(sorted(error.options))} (files in {where})."
        return _one_sentence(error)
    except ConfigCompositionException as error:  # after MissingConfigException, one of its kind
        return _unknown_key(error, overrides) or _one_sentence(error)
    except HydraException as error:
        return _one_sentence(error)
    # A launcher (hydra/launcher=slurm) runs each job of a sweep in the sweep's folder, not run_dir.
    launched = any(override.key_or_group.startswith(("hydra/launcher", "hydra.sweep")) for override in parsed)
    return None if launched else _run_dir_problem(cfg)


def _run_dir_problem(cfg: DictConfig) -> str | None:
    """Refuse a run_dir that cannot be written (or resume=auto without one) before Hydra creates it."""
    from vistok.tokenizers.training.run import check_run_dir

    try:
        check_run_dir(cfg, Path(str(cfg.run_dir)).resolve())
    except VistokError as error:
        return str(error)
    except Exception:  # an interpolation only Hydra's run can resolve: the run itself checks again
        return None
    return None


def _unknown_key(error: Exception, overrides: list[str]) -> str | None:
    """For Hydra's "Could not override 'trainer.max_step'": the setting it most likely meant."""
    import difflib
    import re

    from hydra import compose, initialize_config_dir

    match = re.search(r"Could not override '([^']+)'", str(error))
    if not match:
        return None
    key = match.group(1)
    others = [item for item in overrides if item.lstrip("+~").split("=", 1)[0].split("@", 1)[0] != key]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=others)
    except Exception:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    names = [str(name) for name in node.keys()]
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    where = f"{parent}." if parent else ""
    if close:
        return f"{key} is not a setting; did you mean {where}{close[0]}?"
    return (f"{key} is not a setting; the settings {'of ' + parent if parent else 'at the top level'} are "
            f"{', '.join(sorted(names))} (+{key}=VALUE adds a new key on purpose).")


def _one_sentence(error: Exception) -> str:
    lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip() and not line.startswith("See https")]
    text = "; ".join(line[:1].lower() + line[1:] for line in lines[:2])
    return text + "."


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    """Check the overrides in ``argv`` (default: the command line), then train through Hydra.

    Returns the exit status: 0 after training, 2 for settings refused before training, 130 for
    Ctrl-C before training started (during training, Ctrl-C or SIGTERM saves a checkpoint and
    exits with 128 + the signal's number).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        problem = compose_problem(argv)
        if problem is not None:
            print(f"{prog}: error: {problem}", file=sys.stderr)
            return 2
        _LAUNCH.update(prog=prog, argv=list(sys.argv))
        sys.argv = [sys.argv[0], *argv]  # @hydra.main reads its overrides from sys.argv[1:]
        _train()
    except KeyboardInterrupt:  # Ctrl-C before training started, or twice: there is nothing to save
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
