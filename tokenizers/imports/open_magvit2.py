"""``vistok import open-magvit2``: Open-MAGVIT2 LFQ tokenizers (SEED-Voken) from their Lightning ``.ckpt``.

The released files (``imagenet_256_L.ckpt``, ``imagenet_128_L.ckpt``, ...) are PyTorch Lightning
checkpoints: the weights are under ``"state_dict"`` with keys ``encoder.*``, ``decoder.*``,
``loss.*`` (the discriminator; ignored) and, because the released configs train with
``use_ema: true``, ``model_ema.decay``, ``model_ema.num_updates`` and one ``model_ema.<name>`` per
trainable parameter, ``<name>`` being the parameter's name without dots. The original
reconstruction and evaluation scripts run inside ``model.ema_scope()``, i.e. on the EMA copies, so
the import takes those when present (``--weights raw`` takes ``encoder.*``/``decoder.*`` instead).

The architecture (base width, channel multipliers, blocks per level, LFQ bits) is read from the
tensor shapes; the image size is a flag (``--image-size``, default 256). Key mapping:
``nin_shortcut`` -> ``skip``, ``downsample`` -> ``resample.conv``, ``upsample.conv1`` ->
``resample.conv`` with its output channels permuted from Open-MAGVIT2's depth_to_space order
(channel (2i + j) * C + c) to ``pixel_shuffle``'s (c * 4 + 2i + j). LFQ has no stored state.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.imports.common import Imported, load_weights, read_weights, rename_keys, tensors_only
from vistok.tokenizers.imports.shapes import conv_layout, matching_preset, shape
from vistok.tokenizers.magvit2 import PRESETS

REPOSITORY = "https://github.com/TencentARC/SEED-Voken"
FORMAT = "open-magvit2"
WHAT = "an Open-MAGVIT2 tokenizer"
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


def depth_to_space_to_pixel_shuffle(tensor: torch.Tensor) -> torch.Tensor:
    """Permute a (4C, ...) conv weight or bias from channel (2i + j) * C + c to c * 4 + 2i + j."""
    return tensor.reshape(4, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


RULES = [
    (r"encoder\.down\.(\d+)\.downsample\.(weight|bias)", r"encoder.down.\1.resample.conv.\2"),
    (r"decoder\.up\.(\d+)\.upsample\.conv1\.(weight|bias)", r"decoder.up.\1.resample.conv.\2", depth_to_space_to_pixel_shuffle),
    (r"(.+)\.nin_shortcut\.weight", r"\1.skip.weight"),
    (r"((?:encoder\.down|decoder\.up)\.\d+\.block\.\d+|(?:encoder|decoder)\.mid_block\.\d+)\.((?:norm|conv)[12])\.(weight|bias)", r"\1.\2.\3"),
    (r"decoder\.adaptive\.(\d+)\.(gamma|beta)\.(weight|bias)", r"decoder.adaptive.\1.\2.\3"),
    (r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", r"\1.\2.\3"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=("ema", "raw"), default=None,
                        help="ema: the model_ema.* copies (default when present, as the original evaluation scripts use); raw: encoder.*/decoder.*")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image side the tokenizer takes (default 256; the 128 px release: 128)")


def select_weights(state: dict[str, torch.Tensor], src: Path, choice: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """encoder.*/decoder.* tensors, from the EMA copies (``model_ema.<name without dots>``) or raw."""
    model = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    ema = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS}
    other = sorted(k for k in state if k not in model and not k.startswith((EMA_PREFIX, "loss.")))
    if other:
        raise VistokError(f"{src} holds tensors the open-magvit2 import does not know: {', '.join(map(repr, other[:6]))}; pass an unmodified Open-MAGVIT2 checkpoint.")
    if choice == "ema" and not ema:
        raise VistokError(f"{src} has no model_ema.* weights (it was trained without use_ema); use --weights raw.")
    if choice == "raw" or not ema:
        return model, "raw"
    by_flat_name = {EMA_PREFIX + k.replace(".", ""): k for k in model}
    unknown = sorted(set(ema) - set(by_flat_name))
    if unknown:
        raise VistokError(f"{src} holds EMA tensors that match no encoder/decoder parameter: {', '.join(map(repr, unknown[:6]))}; pass an unmodified Open-MAGVIT2 checkpoint or use --weights raw.")
    missing = sorted(k for flat, k in by_flat_name.items() if flat not in ema)
    if missing:
        raise VistokError(f"{src} lacks the EMA copies of {', '.join(map(repr, missing[:6]))}; use --weights raw.")
    return {k: ema[flat] for flat, k in by_flat_name.items()}, "ema"


def infer_architecture(state: dict[str, torch.Tensor], src: Path) -> dict:
    """build_tokenizer settings read from the shapes of an Open-MAGVIT2 encoder/decoder state dict."""
    return {**conv_layout(state, "encoder.down", "block", str(src), WHAT),
            "bits": int(shape(state, "encoder.conv_out.weight", str(src), WHAT)[0])}


def convert(src: Path, args: argparse.Namespace) -> Imported:
    """Read an Open-MAGVIT2 Lightning ``.ckpt`` (or a bare state dict) and build the vistok tokenizer."""
    from vistok.tokenizers.model import build_tokenizer

    container = read_weights(src, "an Open-MAGVIT2 Lightning checkpoint (.ckpt)")
    if isinstance(container, dict) and "state_dict" in container:
        container = container["state_dict"]
    state, taken = select_weights(tensors_only(container, str(src)), src, args.weights)
    arch = infer_architecture(state, src)
    tokenizer = build_tokenizer(
        arch="open_magvit2", preset=matching_preset(PRESETS, arch, "L"), image_size=args.image_size,
        quantizer={"_target_": "vistok.tokenizers.quantizers.LFQ", "dim": arch["bits"]},
        channels=arch["channels"], channel_mult=arch["channel_mult"], num_res_blocks=arch["num_res_blocks"])
    load_weights(tokenizer, rename_keys(state, RULES, str(src), FORMAT), str(src), FORMAT)
    notes = [
        f"weights: {'the model_ema.* (EMA) copies, as the original evaluation scripts use' if taken == 'ema' else 'encoder.*/decoder.* (no EMA copies taken)'}; loss.* (discriminator) ignored.",
        f"architecture read from the tensor shapes: base width {arch['channels']}, channel_mult {arch['channel_mult']}, "
        f"{arch['num_res_blocks']} blocks per level, {arch['bits']}-bit LFQ; image size {args.image_size} (a flag).",
        "the upsampling convolutions' output channels were permuted from depth_to_space order to pixel_shuffle order.",
    ]
    return Imported(tokenizer, {"format": FORMAT, "repository": REPOSITORY, "weights": taken, "notes": notes})
