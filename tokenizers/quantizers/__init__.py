"""Quantizers: (B, N, D) latents -> QuantizerOutput(quantized, indices, loss, stats).

- VectorQuantizer: nearest learned codeword (VQ-VAE; EMA, factorized/cosine codes, dead-code
  restart); codebook_size = K.
- FSQ: round each bounded channel to a few levels; codebook_size = prod(levels).
- LFQ: sign of each channel (MAGVIT-v2); codebook_size = 2**dim.
- SoftVQ: softmax-weighted mix of codewords; codebook_size = None (continuous tokens).
- DiagonalGaussian: VAE posterior sample (mean in eval) from 2*D channels; codebook_size = None.

``build_quantizer({"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [8, 5, 5, 5]})`` builds one
from a plain config (Hydra style). Only the classes above are accepted as targets: a config never
makes this module import an arbitrary path.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vistok.tokenizers.containers import plain
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, code_stats, counts_stats
from vistok.tokenizers.quantizers.fsq import FSQ
from vistok.tokenizers.quantizers.gaussian import DiagonalGaussian
from vistok.tokenizers.quantizers.lfq import LFQ
from vistok.tokenizers.quantizers.soft import SoftVQ
from vistok.tokenizers.quantizers.vq import VectorQuantizer

__all__ = [
    "DiagonalGaussian",
    "FSQ",
    "LFQ",
    "QUANTIZERS",
    "Quantizer",
    "QuantizerOutput",
    "SoftVQ",
    "VectorQuantizer",
    "build_quantizer",
    "code_stats",
    "counts_stats",
]

QUANTIZERS: dict[str, type[Quantizer]] = {
    "VectorQuantizer": VectorQuantizer,
    "FSQ": FSQ,
    "LFQ": LFQ,
    "SoftVQ": SoftVQ,
    "DiagonalGaussian": DiagonalGaussian,
}

_MODULE_OF = {"VectorQuantizer": "vq", "FSQ": "fsq", "LFQ": "lfq", "SoftVQ": "soft", "DiagonalGaussian": "gaussian"}

# The public path and the defining module's path are both accepted (Hydra users write either), and
# so are the paths of vistok 0.1, whose package was imported as `tokenizers`: its checkpoints and
# format-1 exports name `tokenizers.quantizers.<Class>`.
PACKAGE = "vistok.tokenizers.quantizers"
LEGACY_PACKAGE = "tokenizers.quantizers"
_TARGETS: dict[str, type[Quantizer]] = {}
for _package in (PACKAGE, LEGACY_PACKAGE):
    for _name, _cls in QUANTIZERS.items():
        _TARGETS[f"{_package}.{_name}"] = _cls
        _TARGETS[f"{_package}.{_MODULE_OF[_name]}.{_name}"] = _cls


def build_quantizer(config: Mapping[str, Any]) -> Quantizer:
    """Build a quantizer from ``{"_target_": "vistok.tokenizers.quantizers.<Class>", **kwargs}``.

    Raises VistokError for an unknown target or keyword arguments the class does not take.
    """
    if not isinstance(config, Mapping):
        raise VistokError(f"A quantizer config must be a mapping with a '_target_' key, got {type(config).__name__}.")
    kwargs = plain(config)
    target = kwargs.pop("_target_", None)
    cls = _TARGETS.get(target) if isinstance(target, str) else None
    if cls is None:
        choices = ", ".join(f"{PACKAGE}.{name}" for name in QUANTIZERS)
        raise VistokError(f"Unknown quantizer _target_ {target!r}; use one of {choices}.")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise VistokError(f"Bad arguments for {cls.__name__} ({error}); see help(vistok.tokenizers.quantizers.{cls.__name__}) for its options.") from None
