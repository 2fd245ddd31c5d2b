"""Training settings: the ``loss``, ``optim``, ``ema`` and ``validation`` blocks of configs/train.yaml.

``configs/train.yaml`` holds every setting's one default value, next to its comment; the
dataclasses here hold the names and types only. :func:`parse_settings` fills what a caller leaves
out from that file, so ``TokenizerModule(tokenizer, loss={"l2_weight": 1.0})`` from Python trains
with the same defaults as ``vistok train``, and it refuses a key that is not a setting (a typo is
an error, not a silently ignored value).
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import OmegaConf

from vistok.tokenizers.containers import plain
from vistok.tokenizers.errors import VistokError

# The Hydra configs ship inside the package (package data), so an installed vistok trains from any folder.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BLOCKS = ("loss", "optim", "ema", "validation")


@dataclass
class PerceptualSettings:
    weight: float
    weights_path: str | None


@dataclass
class AdversarialSettings:
    weight: float
    start: int
    adaptive: bool
    max_adaptive_weight: float
    channels: int
    num_layers: int
    norm: str
    lecam_weight: float
    lecam_decay: float
    lr: float | None


@dataclass
class LossSettings:
    l1_weight: float
    l2_weight: float
    quantizer_weight: float
    proxy_weight: float
    perceptual: PerceptualSettings
    adversarial: AdversarialSettings


@dataclass
class OptimSettings:
    lr: float
    betas: list[float]
    weight_decay: float
    eps: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    finite_check_every: int | None


@dataclass
class EMASettings:
    enabled: bool
    decay: float
    use_warmup: bool
    warmup_power: float


@dataclass
class ValidationSettings:
    token_counts: list[int] | None
    grid_images: int


@functools.cache
def _train_yaml_blocks() -> dict[str, Any]:
    config = OmegaConf.load(CONFIG_DIR / "train.yaml")
    return {block: plain(config[block]) for block in BLOCKS}


def default_settings(where: str) -> dict[str, Any]:
    """The defaults of one block of configs/train.yaml by its dotted name, e.g. ``"loss.perceptual"`` (a copy)."""
    block: Any = _train_yaml_blocks()
    for name in where.split("."):
        block = block[name]
    return copy.deepcopy(block)


def parse_settings(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``values``, the settings at ``where`` (``"loss"``, ``"loss.adversarial"``, ...).

    Keys left out take their default from configs/train.yaml (nested blocks key by key); a key
    ``cls`` does not have is a VistokError naming it.
    """
    if values is not None and not isinstance(values, Mapping):
        raise VistokError(f"{where} is {values!r} but must be a block of settings (name: value); fix that setting.")
    values = dict(values or {})
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        listed = ", ".join(f"{where}.{name}" for name in unknown)
        raise VistokError(f"unknown setting(s) {listed}; the settings of {where} are {', '.join(sorted(names))}.")
    defaults = default_settings(where)
    types = get_type_hints(cls)
    parsed = {}
    for name in names:
        nested = types[name] if is_dataclass(types[name]) else None
        if nested is not None and not isinstance(values.get(name), nested):
            parsed[name] = parse_settings(nested, values.get(name), f"{where}.{name}")
        else:
            parsed[name] = values[name] if name in values else defaults[name]
    return cls(**parsed)


def check_ranges(loss: LossSettings, optim: OptimSettings, ema: EMASettings) -> None:
    """Refuse values no run can use (negative weights, a decay of 1, text for a number) in one sentence."""
    adversarial = loss.adversarial
    rules = [
        ("loss.l1_weight", loss.l1_weight, lambda v: v >= 0, ">= 0"),
        ("loss.l2_weight", loss.l2_weight, lambda v: v >= 0, ">= 0"),
        ("loss.quantizer_weight", loss.quantizer_weight, lambda v: v >= 0, ">= 0"),
        ("loss.proxy_weight", loss.proxy_weight, lambda v: v >= 0, ">= 0"),
        ("loss.perceptual.weight", loss.perceptual.weight, lambda v: v >= 0, ">= 0"),
        ("loss.adversarial.weight", adversarial.weight, lambda v: v >= 0, ">= 0"),
        ("loss.adversarial.start", adversarial.start, lambda v: v >= 0, ">= 0"),
        ("loss.adversarial.lecam_weight", adversarial.lecam_weight, lambda v: v >= 0, ">= 0"),
        ("loss.adversarial.lecam_decay", adversarial.lecam_decay, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optim.lr", optim.lr, lambda v: v > 0, "> 0"),
        ("optim.weight_decay", optim.weight_decay, lambda v: v >= 0, ">= 0"),
        ("optim.warmup_steps", optim.warmup_steps, lambda v: v >= 0, ">= 0"),
        ("optim.min_lr_ratio", optim.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("optim.grad_clip", optim.grad_clip, lambda v: v >= 0, ">= 0 (0 = no clipping)"),
        ("optim.finite_check_every", optim.finite_check_every, lambda v: v is None or (isinstance(v, int) and v >= 0),
         "an integer >= 0 (0 = only before checkpoints and validation) or null (every trainer.log_every_n_steps)"),
        ("optim.betas", optim.betas, lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        ("ema.decay", ema.decay, lambda v: 0 <= v < 1, "in [0, 1)"),
    ]
    for name, value, rule, expected in rules:
        try:
            ok = not isinstance(value, (bool, str)) and rule(value)
        except TypeError:
            ok = False
        if not ok:
            raise VistokError(f"{name} is {value!r} but must be {expected}; fix that setting.")
