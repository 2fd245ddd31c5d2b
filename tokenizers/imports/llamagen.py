"""``vistok import llamagen``: LlamaGen's VQ tokenizers (VQ-16, VQ-8) from their ``.pt`` files.

The released files (``vq_ds16_c2i.pt``, ``vq_ds16_t2i.pt``, ``vq_ds8_c2i.pt``) are what
``tokenizer/tokenizer_image/vq_train.py`` saves: a dict with ``"model"`` (the VQModel state dict),
optionally ``"ema"``, plus optimizer and discriminator states, ``"steps"`` and ``"args"`` (an
``argparse.Namespace``, the only non-tensor object allowed while loading with ``weights_only``).
Like LlamaGen's reconstruction scripts (``vq_demo.py``, ``reconstruction_vq_ddp.py``), the import
takes ``"ema"`` when present, else ``"model"``, else ``"state_dict"``; a bare state dict works too.

The architecture (base width, channel multipliers, blocks per level, ``z_channels``, codebook
size and dimension) is read from the tensor shapes. What shapes cannot tell is a flag: the image
size (``--image-size``, default 256) and whether codes are l2-normalised (on in every released
model). Key mapping: ``nin_shortcut`` -> ``skip``, attention ``q``/``k``/``v`` -> one ``qkv``
convolution, ``proj_out`` -> ``proj``, ``quant_conv`` into the encoder, ``post_quant_conv`` into the
decoder, the codebook into vistok's VectorQuantizer (stored unnormalised; it normalises on use);
``quantize.codebook_used`` (a training-usage counter) is dropped.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.imports.common import Imported, load_weights, read_weights, rename_keys, tensors_only
from vistok.tokenizers.imports.shapes import conv_layout, matching_preset, shape
from vistok.tokenizers.llamagen import PRESETS

REPOSITORY = "https://github.com/FoundationVision/LlamaGen"
FORMAT = "llamagen"
WHAT = "a LlamaGen VQ tokenizer"
CONTAINER_KEYS = ("ema", "model", "state_dict")  # preference order of LlamaGen's vq_demo.py
ATTENTION = r"(?:conv_blocks\.\d+\.attn\.\d+|mid\.1)"

RULES = [
    (r"quantize\.embedding\.weight", "quantizer.codebook"),
    (r"quant_conv\.(weight|bias)", r"encoder.quant_conv.\1"),
    (r"post_quant_conv\.(weight|bias)", r"decoder.post_quant_conv.\1"),
    (r"(encoder|decoder)\.conv_blocks\.(\d+)\.(?:downsample|upsample)\.conv\.(weight|bias)", r"\1.conv_blocks.\2.resample.conv.\3"),
    (r"(.+)\.nin_shortcut\.(weight|bias)", r"\1.skip.\2"),
    (rf"((?:encoder|decoder)\.{ATTENTION})\.proj_out\.(weight|bias)", r"\1.proj.\2"),
    (rf"((?:encoder|decoder)\.{ATTENTION})\.(qkv|norm)\.(weight|bias)", r"\1.\2.\3"),
    (r"((?:encoder|decoder)\.(?:conv_blocks\.\d+\.res\.\d+|mid\.[02]))\.((?:norm|conv)[12])\.(weight|bias)", r"\1.\2.\3"),
    (r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", r"\1.\2.\3"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=CONTAINER_KEYS, default=None,
                        help="which weights of the .pt to import (default: ema if present, else model, as LlamaGen's vq_demo.py)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image side the tokenizer takes (default 256, the released models' training size)")
    parser.add_argument("--codebook-l2-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="l2-normalise latents and codes before the lookup (LlamaGen's codebook_l2_norm, on in the released models)")


def select_weights(container: object, src: Path, choice: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to import from a LlamaGen ``.pt`` and the name of the copy taken."""
    if isinstance(container, dict) and any(key in container for key in CONTAINER_KEYS):
        if choice is not None:
            if choice not in container:
                raise VistokError(f"{src} has no {choice!r} weights (it holds {', '.join(k for k in CONTAINER_KEYS if k in container)}); pick one of those with --weights.")
            return tensors_only(container[choice], f"{src}[{choice!r}]"), choice
        key = next(key for key in CONTAINER_KEYS if key in container)
        return tensors_only(container[key], f"{src}[{key!r}]"), key
    if choice is not None:
        raise VistokError(f"{src} is a bare state dict without 'ema'/'model' entries; leave --weights unset.")
    return tensors_only(container, str(src)), "model"


def infer_architecture(state: dict[str, torch.Tensor], src: Path) -> dict:
    """build_tokenizer settings read from the shapes of a LlamaGen VQModel state dict."""
    codebook_size, codebook_dim = shape(state, "quantize.embedding.weight", str(src), WHAT)
    return {
        **conv_layout(state, "encoder.conv_blocks", "res", str(src), WHAT),
        "z_channels": int(shape(state, "encoder.conv_out.weight", str(src), WHAT)[0]),
        "codebook_size": int(codebook_size),
        "codebook_dim": int(codebook_dim),
    }


def merge_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate each attention block's q, k, v 1x1 convolutions into one ``qkv`` (output order q, k, v)."""
    out = dict(state)
    for key in list(state):
        m = re.fullmatch(r"(.+)\.q\.(weight|bias)", key)
        if m and all(f"{m.group(1)}.{p}.{m.group(2)}" in state for p in "kv"):
            parts = [out.pop(f"{m.group(1)}.{p}.{m.group(2)}") for p in "qkv"]
            out[f"{m.group(1)}.qkv.{m.group(2)}"] = torch.cat(parts, dim=0)
    return out


def convert(src: Path, args: argparse.Namespace) -> Imported:
    """Read a LlamaGen ``.pt`` (or a bare VQModel state dict) and build the vistok tokenizer."""
    from vistok.tokenizers.model import build_tokenizer

    with torch.serialization.safe_globals([argparse.Namespace]):
        container = read_weights(src, "a LlamaGen tokenizer checkpoint (.pt)")
    state, taken = select_weights(container, src, args.weights)
    arch = infer_architecture(state, src)
    used = state.pop("quantize.codebook_used", None)
    tokenizer = build_tokenizer(
        arch="llamagen", preset=matching_preset(PRESETS, arch, "vq16"), image_size=args.image_size,
        quantizer={"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": arch["codebook_dim"],
                   "codebook_size": arch["codebook_size"], "use_cosine": bool(args.codebook_l2_norm)},
        channels=arch["channels"], channel_mult=arch["channel_mult"], num_res_blocks=arch["num_res_blocks"],
        z_channels=arch["z_channels"])
    load_weights(tokenizer, rename_keys(merge_qkv(state), RULES, str(src), FORMAT), str(src), FORMAT)
    notes = [
        f"weights: the {taken!r} entry of the .pt (LlamaGen's reconstruction scripts prefer 'ema', then 'model').",
        f"architecture read from the tensor shapes: base width {arch['channels']}, channel_mult {arch['channel_mult']}, "
        f"{arch['num_res_blocks']} blocks per level, z_channels {arch['z_channels']}, {arch['codebook_size']} codes of dimension "
        f"{arch['codebook_dim']} ({'l2-normalised' if args.codebook_l2_norm else 'not normalised'}); image size {args.image_size} (a flag).",
    ]
    if used is not None:
        notes.append("quantize.codebook_used (a training-time usage counter) was dropped.")
    return Imported(tokenizer, {"format": FORMAT, "repository": REPOSITORY, "weights": taken, "notes": notes})
