from vistok_cli import ensure_own_tokenizers

ensure_own_tokenizers("train.py")  # before anything imports `tokenizers` (Hugging Face's has the same name)

# Train a tokenizer: python train.py [experiment=NAME] [group=option ...] [key=value ...]
#
# With no arguments this runs the CPU demo (experiment=demo). The configuration lives in configs/
# (Hydra); configs/train.yaml lists the settings and README.md shows examples. Bad settings stop
# before training with one sentence on stderr and exit status 2.
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tokenizers.errors import VistokError

PROG = "train.py"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Config groups picked on the command line (quantizer=vq); hydra/launcher is left to Hydra.
GROUPS = ("model", "quantizer", "data", "trainer", "logger", "callbacks", "experiment")


def override_problem(argv: list[str]) -> str | None:
    """One sentence for command-line overrides Hydra would refuse, or None.

    Hydra reports a missing group option (quantizer=nope), a key that is not in the config or a
    malformed override with several lines, a hint about HYDRA_FULL_ERROR and exit status 1;
    composing the config here first keeps the project's rule (one sentence, exit status 2).
    Runs with Hydra's own flags (-m, --cfg, ...) or sweeps are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(arg.startswith("-") for arg in argv):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(argv)
    except HydraException as error:
        return _one_sentence(error)
    for override in overrides:
        if override.is_sweep_override():
            return None
        group = override.key_or_group
        if group in GROUPS and not override.is_delete():
            choice = override.get_value_element_as_str()
            available = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            if choice not in available:
                return f"unknown {group} '{choice}'; choose one of {', '.join(available)} (files in configs/{group}/)."
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            compose("train", overrides=argv)
    except HydraException as error:
        return _one_sentence(error)
    return None


def _one_sentence(error: Exception) -> str:
    lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip() and not line.startswith("See https")]
    text = "; ".join(line[:1].lower() + line[1:] for line in lines[:2])
    return text + "."


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tokenizers.module import TrainingDiverged
    from tokenizers.training import run_training

    # Hydra already logs to the console and train.log; the `lightning` package's own console
    # handler would print every Lightning message a second time.
    lightning_logger = logging.getLogger("lightning")
    for handler in [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]:
        lightning_logger.removeHandler(handler)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_training(cfg, run_dir)
    except VistokError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        from tokenizers.training import list_checkpoints

        kept = list_checkpoints(run_dir)
        where = f"the last good checkpoint is {kept[0]}" if kept else "no checkpoint had been written yet"
        print(f"{PROG}: error: {error}; {where}.", file=sys.stderr)
        raise SystemExit(1) from None
    if result.table:
        print(result.table)


if __name__ == "__main__":
    problem = override_problem(sys.argv[1:])
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    main()
