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
    # Python put this script's folder first on sys.path; in a checkout that folder holds
    # tokenizers/, data/ and eval/, which would hide Hugging Face's `tokenizers` (and anything
    # else named data or eval) from every import below. vistok comes from its installation.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
    try:
        import vistok  # noqa: F401
    except ModuleNotFoundError:
        print("train.py: error: vistok is not installed in this Python environment; install it first "
              "(pip install -e . in this folder, as README.md shows).", file=sys.stderr)
        raise SystemExit(2) from None

import logging

import hydra
from omegaconf import DictConfig

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.training.run import CONFIG_DIR, compose_problem

# How this process was started: the command's name for error sentences (train.py or vistok train)
# and the original sys.argv, which Lightning's DDP launcher replays to start the other ranks.
_LAUNCH: dict = {"prog": "train.py", "argv": None}


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from vistok.tokenizers.training.module import TrainingDiverged
    from vistok.tokenizers.training.run import list_checkpoints, run_training

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
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        kept = list_checkpoints(run_dir)
        where = f"the last good checkpoint is {kept[0]}" if kept else "no checkpoint had been written yet"
        print(f"{prog}: error: {error}; {where}.", file=sys.stderr)
        raise SystemExit(1) from None
    if result.table:
        print(result.table)


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    """Check the overrides in ``argv`` (default: the command line), then train through Hydra.

    Returns the exit status: 0 after training, 2 for settings refused before training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    problem = compose_problem(argv)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    _LAUNCH.update(prog=prog, argv=list(sys.argv))
    sys.argv = [sys.argv[0], *argv]  # @hydra.main reads its overrides from sys.argv[1:]
    _train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
