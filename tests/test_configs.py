"""Recipes that compose: every experiment with every model and quantizer option, and the READMEs' commands.

An experiment (configs/experiment/) picks its model and quantizer options and sets nothing that only
one model or quantizer accepts, so ``experiment=X quantizer=Y`` or ``model=Z`` replaces the whole part.
A combination that really cannot work stops before training with one sentence naming both parts.
Full-size tokenizers are built on the meta device (no memory, no initialisation), so this stays fast.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.model import build_tokenizer
from vistok.tokenizers.training.module import TokenizerModule
from vistok.tokenizers.training.run import build_module, run_training, tokenizer_config
from vistok.tokenizers.training.settings import CONFIG_DIR
from vistok.train import compose_problem

ROOT = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


EXPERIMENTS, MODELS, QUANTIZERS = options("experiment"), options("model"), options("quantizer")
# The recipes' validation.token_counts reach 256; a model with fewer tokens cannot report them.
INCOMPATIBLE = {(experiment, model) for experiment in ("flex_fsq", "tail_drop_vq")
                for model in ("conv", "titok", "titok_b64", "titok_demo", "titok_original_b64", "titok_rd32")}
# Stage 1 of two-stage TiTok learns a teacher's codes: without teacher=PATH it stops in one sentence.
NEEDS_TEACHER = {"titok_two_stage"}
# No VGG16 weights here, and timm's EMA copy cannot live on the meta device; neither touches the
# model, the quantizer or the validation token counts that these tests check.
META_SAFE = ["loss.perceptual.weight=0", "ema.enabled=false"]


def make_cfg(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def build_on_meta(cfg) -> TokenizerModule:
    """What run_training builds first (tokenizer, losses, validation settings), on the meta device."""
    with torch.device("meta"):
        return build_module(cfg)


# ---------------------------------------------------------------------------------------------
# Every experiment with every option of the swappable parts


@functools.cache
def option(group: str, name: str) -> dict:
    """What ``group=name`` composes to under the demo, which adds only model.token_dropout to either group."""
    return OmegaConf.to_container(make_cfg(f"{group}={name}")[group])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_experiment_takes_every_quantizer(experiment, quantizer):
    cfg = make_cfg(f"experiment={experiment}", f"quantizer={quantizer}", *META_SAFE)
    assert OmegaConf.to_container(cfg.quantizer) == option("quantizer", quantizer)  # nothing inherited
    if experiment in NEEDS_TEACHER:
        with pytest.raises(VistokError, match="pass teacher=PATH"):
            build_on_meta(cfg)
        return
    module = build_on_meta(cfg)
    assert module.tokenizer.config["quantizer"]["_target_"] == option("quantizer", quantizer)["_target_"]
    assert module.val_token_counts[-1] <= module.tokenizer.max_tokens


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("model", MODELS)
def test_every_experiment_takes_every_model_or_names_the_conflict(experiment, model):
    cfg = make_cfg(f"experiment={experiment}", f"model={model}", *META_SAFE)
    # the whole model option, plus the recipe's tail-token dropout (which every model takes)
    composed = OmegaConf.to_container(cfg.model)
    assert {**composed, "token_dropout": None} == {**option("model", model), "token_dropout": None}
    if experiment in NEEDS_TEACHER:
        with pytest.raises(VistokError, match="pass teacher=PATH"):
            build_on_meta(cfg)
        return
    if (experiment, model) not in INCOMPATIBLE:
        module = build_on_meta(cfg)
        assert module.tokenizer.config["arch"] == option("model", model)["arch"]
        assert module.val_token_counts[-1] <= module.tokenizer.max_tokens
        return
    with torch.device("meta"):
        tokens = build_tokenizer(**tokenizer_config(cfg)).max_tokens
    assert max(cfg.validation.token_counts) > tokens
    with pytest.raises(VistokError) as refused:
        build_on_meta(cfg)
    message = str(refused.value)
    assert "validation.token_counts" in message and f"the model has {tokens} tokens per image" in message
    assert "validation.token_counts=null" in message and message.endswith(".") and "\n" not in message


def test_the_command_line_choice_beats_the_experiments():
    """Hydra 1.3: a group option on the command line replaces the one an experiment's defaults pick."""
    cfg = make_cfg("experiment=titok_b64_vq", "quantizer=fsq", "model=conv", hydra=True)
    assert cfg.hydra.runtime.choices.quantizer == "fsq" and cfg.hydra.runtime.choices.model == "conv"
    assert cfg.quantizer == OmegaConf.load(CONFIG_DIR / "quantizer" / "fsq.yaml")
    assert cfg.model == OmegaConf.load(CONFIG_DIR / "model" / "conv.yaml")
    assert cfg.optim.betas == [0.9, 0.999] and cfg.loss.adversarial.lecam_weight == 0.001  # the recipe stays


# What each recipe trains: the option files carry the values the experiments used to set themselves.
RECIPES = {
    "demo": ({"arch": "titok", "preset": "tiny", "image_size": 32, "patch_size": 8, "num_tokens": 16, "width": 128,
              "heads": 4, "decoder_head": "conv", "encoder_pos_std": 0.5, "attn_bias_std": 1.0,
              "token_dropout": {"p": 0.5, "min_tokens": 1, "distribution": "uniform", "start_step": 0, "stop_step": None}},
             {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [8, 5, 5, 5]}),
    "rd32": ({"arch": "titok", "preset": "tiny", "image_size": 32, "patch_size": 8, "num_tokens": 64, "width": 128,
              "heads": 4, "decoder_head": "conv", "decoder_head_channels": 32, "encoder_pos_std": 0.5,
              "attn_bias_std": 1.0,
              "token_dropout": {"p": 0.5, "min_tokens": 1, "distribution": "uniform", "start_step": 2500,
                                "stop_step": None}},
             {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [8, 5, 5, 5]}),
    "titok_b64_vq": ({"arch": "titok", "preset": "base", "image_size": 256, "patch_size": 16, "num_tokens": 64,
                      "token_dropout": None},
                     {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 12, "codebook_size": 4096,
                      "use_cosine": True, "commitment_weight": 0.25, "ema": False, "dead_code_steps": 0}),
    "flex_fsq": ({"arch": "titok", "preset": "base", "image_size": 256, "patch_size": 16, "num_tokens": 256,
                  "token_dropout": {"p": 1.0, "min_tokens": 1, "distribution": "uniform", "start_step": 0,
                                    "stop_step": None}},
                 {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [8, 8, 8, 5, 5, 5]}),
    "tail_drop_vq": ({"arch": "titok", "preset": "base", "image_size": 256, "patch_size": 16, "num_tokens": 256,
                      "token_dropout": {"p": 1.0, "min_tokens": 1, "distribution": "uniform", "start_step": 0,
                                    "stop_step": None}},
                     {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 12, "codebook_size": 4096,
                      "use_cosine": True, "commitment_weight": 0.25, "ema": False, "dead_code_steps": 0}),
    "titok_two_stage": ({"arch": "titok_original", "preset": "base", "image_size": 256, "patch_size": 16,
                         "num_tokens": 64, "legacy_reshape": False, "pixel_decoder": None, "token_dropout": None},
                        {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 12, "codebook_size": 4096,
                         "use_cosine": True, "commitment_weight": 0.25, "ema": False, "dead_code_steps": 0}),
    "titok_two_stage_decoder": ({"arch": "titok_original", "preset": "base", "image_size": 256, "patch_size": 16,
                                 "num_tokens": 64, "pixel_decoder": None, "token_dropout": None},
                                {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 12,
                                 "codebook_size": 4096, "use_cosine": True, "commitment_weight": 0.25, "ema": False,
                                 "dead_code_steps": 0}),
    "vqgan_f16": ({"arch": "conv", "preset": "f16", "image_size": 256, "token_dropout": None},
                  {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 256, "codebook_size": 1024,
                   "use_cosine": False, "commitment_weight": 0.25, "ema": False, "dead_code_steps": 0}),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_recipe_keeps_its_model_and_quantizer(experiment):
    model, quantizer = RECIPES[experiment]
    cfg = make_cfg(f"experiment={experiment}")
    assert {key: cfg.model.get(key) for key in model} == model
    assert OmegaConf.to_container(cfg.quantizer) == quantizer


# ---------------------------------------------------------------------------------------------
# The commands README.md, slurm/README.md and the config files' comments show


def example_commands() -> list[tuple[str, list[str], str | None]]:
    """(where, arguments, the error sentence printed under it or None) for every ``python train.py`` example:
    the READMEs' code blocks and the config files' comments."""
    readmes = [(ROOT / "README.md", r"```[a-z]*\n(.*?)```"), (ROOT / "slurm" / "README.md", r"```[a-z]*\n(.*?)```")]
    comments = [(path, r"((?:#.*\n)+)") for path in sorted(CONFIG_DIR.rglob("*.yaml"))]
    found = []
    for path, block_pattern in readmes + comments:
        command_pattern = r"^(?:\$ )?(python train\.py\b.*)" if path.suffix == ".md" else r"(python train\.py\b[^`]*)"
        for block in re.findall(block_pattern, path.read_text(), flags=re.S):
            lines = re.sub(r"\\\n#?", " ", block).splitlines()  # join continued lines
            for number, line in enumerate(lines):
                match = re.search(command_pattern, line)
                if match is None:
                    continue
                command = match.group(1)
                output = lines[number + 1] if number + 1 < len(lines) else ""
                error = output.removeprefix("train.py: error: ") if output.startswith("train.py: error: ") else None
                found.append((f"{path.relative_to(ROOT)}: {' '.join(command.split())[:80]}",
                              shlex.split(command, comments=True)[2:], error))
    return found


def jobs(arguments: list[str]) -> list[list[str]]:
    """The override lists Hydra runs for these arguments: one, or one per combination of a sweep (-m)."""
    overrides = OverridesParser.create().parse_overrides([a for a in arguments if a not in ("-m", "--multirun")])
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [o.input_line] for o in overrides]
    return [list(job) for job in itertools.product(*values)]


# each distinct command once, where it first appears (README.md and two config comments show plain `python train.py`)
EXAMPLES = list({(tuple(arguments), error): (where, arguments, error)
                 for where, arguments, error in reversed(example_commands())}.values())[::-1]


def test_the_examples_were_found():
    places = {where.split(":")[0] for where, _, _ in EXAMPLES}
    assert {"README.md", "slurm/README.md", "configs/hydra/launcher/slurm.yaml"} <= places
    assert len(EXAMPLES) >= 12
    assert any("quantizer=vq,fsq,lfq" in arguments and "experiment=titok_b64_vq" in arguments
               for _, arguments, _ in EXAMPLES)


@pytest.mark.parametrize("where, arguments, error", EXAMPLES, ids=[where for where, _, _ in EXAMPLES])
def test_every_example_command_builds(where, arguments, error):
    if error is not None:  # an example of a refusal: the sentence shown is the one printed
        assert compose_problem(arguments) == error
        return
    if "hydra/launcher=slurm" in arguments:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional `slurm` extra is not installed")
    for job in jobs(arguments):
        assert compose_problem(job) is None
        module = build_on_meta(make_cfg(*job, *META_SAFE))
        assert module.val_token_counts[-1] <= module.tokenizer.max_tokens


# ---------------------------------------------------------------------------------------------
# A few training steps of swapped recipes, shrunk to fit a CPU


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The embedded sample with few crops, built once for this file's runs."""
    return tmp_path_factory.mktemp("sample-data")


def small_run(data_dir: Path) -> list[str]:
    """Two steps and one validation batch on the embedded sample, CSV logger, no VGG16 (absent here)."""
    return ["data=sample", f"data.data_dir={data_dir}", "data.batch_size=4", "data.num_workers=0",
            "data.crops_per_photo=2", "data.val_crops_per_photo=2", "data.shuffle_buffer=0", "trainer=cpu",
            "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "optim.warmup_steps=1", "validation.grid_images=2", "loss.perceptual.weight=0"]


# TiTok-B-64's recipe on a one-block TiTok at 16 px; its discriminator (LeCAM, fixed weight) starts at
# step 1 with one layer, so the GAN part of the recipe runs too.
SHRUNK_TITOK_B64 = ["experiment=titok_b64_vq", "model.preset=tiny", "model.image_size=16", "model.patch_size=4",
                    "model.num_tokens=8", "model.width=16", "model.depth=1", "model.heads=2",
                    "loss.adversarial.start=1", "loss.adversarial.num_layers=1"]


@pytest.mark.parametrize("overrides, target, tokens", [
    ([*SHRUNK_TITOK_B64, "quantizer=vq"], "VectorQuantizer", 8),  # README's SLURM sweep: quantizer=vq,fsq,lfq
    ([*SHRUNK_TITOK_B64, "quantizer=fsq"], "FSQ", 8),
    ([*SHRUNK_TITOK_B64, "quantizer=lfq"], "LFQ", 8),
    (["model=conv", "quantizer=vq", "model.image_size=64"], "VectorQuantizer", 64),  # README: 8x8 grid at 64 px
], ids=["titok_b64_vq-vq", "titok_b64_vq-fsq", "titok_b64_vq-lfq", "demo-conv-vq-64px"])
def test_swapped_recipes_train(overrides, target, tokens, data_dir, tmp_path):
    cfg = make_cfg(*overrides, *small_run(data_dir))
    result = run_training(cfg, tmp_path)
    assert result.step == 2 and result.token_counts[-1] == tokens
    assert math.isfinite(result.metrics["val/psnr"]) and result.metrics["val/images"] > 0
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.quantizer._target_ == f"vistok.tokenizers.quantizers.{target}"
    if "experiment=titok_b64_vq" in overrides:  # the rest of the recipe is still the recipe's
        assert saved.optim.betas == [0.9, 0.999] and saved.loss.adversarial.lecam_weight == 0.001
        logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"train/generator", "train/discriminator"} <= set(logged)  # the recipe's GAN ran
