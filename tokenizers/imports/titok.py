"""``vistok import titok``: TiTok checkpoints of bytedance/1d-tokenizer.

Read as published: a folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
(the Hugging Face hub repos ``yucornetto/tokenizer_titok_*``), or a bare state dict (the ``.bin``
files the inference configs point at) with ``--config`` (that config.json, or the YAML config).
Keys are the original's, without any prefix.

What is read from where: widths, depths, patch size, image size, number of tokens, token size and
codebook size from the tensor shapes; the VQ's l2-normalisation, ``is_legacy`` (the token/channel
reshape of the released two-stage models), ``quantize_mode`` and the model size names from the
config. TiTok's size names fix the number of attention heads, which no shape shows: small 8,
base 12, large 16; for any other name pass ``--heads`` (and ``--decoder-heads``). Two-stage
checkpoints carry the MaskGIT-VQGAN pixel decoder (``pixel_decoder.*``, ``pixel_quantize.*``),
whose sizes are read from its shapes.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.imports.common import Imported, load_weights, read_json, read_weights, rename_keys, tensors_only
from vistok.tokenizers.imports.shapes import count, shape

REPOSITORY = "https://github.com/bytedance/1d-tokenizer"
# modeling/modules/blocks.py: TiTokEncoder / TiTokDecoder size tables (heads only; widths and depths come from shapes)
HEADS = {"small": 8, "base": 12, "large": 16}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WHAT = "a TiTok"  # completes the shape helpers' sentences: "pass a TiTok checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="the model's config (config.json or the YAML inference config); needed when SRC is a bare state dict")
    parser.add_argument("--heads", type=int, default=None, help="encoder attention heads, for a size name TiTok's table does not know (small 8, base 12, large 16)")
    parser.add_argument("--decoder-heads", type=int, default=None, help="decoder attention heads (default: --heads, or the decoder size name's)")


def _squeeze_1x1(tensor: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as the equivalent linear weight (out, in)."""
    return tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor


def _block_rules(part: str) -> list[tuple[str, str]]:
    """ResidualAttentionBlock (nn.MultiheadAttention, q/k/v packed in that order) -> timm Block."""
    prefix = rf"({part})\.transformer\.(\d+)\."
    return [
        (prefix + r"ln_1\.(weight|bias)", r"\1.blocks.\2.norm1.\3"),
        (prefix + r"ln_2\.(weight|bias)", r"\1.blocks.\2.norm2.\3"),
        (prefix + r"attn\.in_proj_(weight|bias)", r"\1.blocks.\2.attn.qkv.\3"),
        (prefix + r"attn\.out_proj\.(weight|bias)", r"\1.blocks.\2.attn.proj.\3"),
        (prefix + r"mlp\.c_fc\.(weight|bias)", r"\1.blocks.\2.mlp.fc1.\3"),
        (prefix + r"mlp\.c_proj\.(weight|bias)", r"\1.blocks.\2.mlp.fc2.\3"),
    ]


RULES = [
    (r"latent_tokens", r"encoder.latent_tokens"),
    (r"(encoder|decoder)\.(class_embedding|mask_token|ln_pre\.weight|ln_pre\.bias|ln_post\.weight|ln_post\.bias)", r"\1.\2"),
    (r"(encoder|decoder)\.positional_embedding", r"\1.pos_embed"),
    (r"(encoder|decoder)\.latent_token_positional_embedding", r"\1.latent_pos_embed"),
    (r"encoder\.patch_embed\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    *_block_rules("encoder"),
    *_block_rules("decoder"),
    (r"encoder\.conv_out\.(weight|bias)", r"encoder.proj.\1", _squeeze_1x1),
    (r"decoder\.decoder_embed\.(weight|bias)", r"decoder.proj_in.\1"),
    (r"decoder\.conv_out\.(weight|bias)", r"decoder.conv_out.\1"),
    (r"quantize\.embedding\.weight", r"quantizer.codebook"),
    (r"pixel_quantize\.embedding\.weight", r"decoder.pixel_quantizer.codebook"),
    (r"pixel_decoder\.(.+)", r"decoder.pixel_decoder.\1"),
]
SINGLE_STAGE_HEAD = [(r"decoder\.ffn\.0\.(weight|bias)", r"decoder.head.\1", _squeeze_1x1)]
PROXY_HEAD = [(r"decoder\.ffn\.(0|2)\.(weight|bias)", r"decoder.head.\1.\2", _squeeze_1x1)]


def _read_config(path: Path) -> dict[str, Any]:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            config = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise VistokError(f"{path} does not exist; pass the TiTok config published with the weights.") from None
        except (OSError, yaml.YAMLError) as error:
            raise VistokError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); pass the TiTok config published with the weights.") from None
    else:
        config = read_json(path)
    vq = (config.get("model") or {}).get("vq_model") if isinstance(config, dict) else None
    if not isinstance(vq, dict):
        raise VistokError(f"{path} has no model.vq_model section; pass the TiTok config (config.json or configs/infer/TiTok/*.yaml) published with the weights.")
    return config


def _read_source(src: Path, config_path: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(state dict, config, weights file) from a hub folder or a bare state dict + --config."""
    if src.is_dir():
        weights = next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)
        if weights is None:
            raise VistokError(f"{src} holds neither {' nor '.join(WEIGHT_FILES)}; pass the downloaded TiTok folder or a state dict file with --config.")
        config_file = Path(config_path) if config_path else src / "config.json"
    else:
        if not src.exists():
            raise VistokError(f"{src} does not exist; pass a TiTok folder (config.json + weights) or a state dict file with --config.")
        if config_path is None:
            raise VistokError(f"{src} is a bare state dict, which does not say its architecture; pass --config with the model's config.json or YAML config.")
        weights, config_file = src, Path(config_path)
    config = _read_config(config_file)
    state = tensors_only(read_weights(weights, "a TiTok state dict (.bin or .safetensors)"), str(weights))
    return state, config, weights


def _heads(size: Any, given: int | None, part: str, src: Path) -> int:
    if given is not None:
        return int(given)
    if size in HEADS:
        return HEADS[size]
    flag = "--heads" if part == "encoder" else "--decoder-heads"
    raise VistokError(f"{src}'s {part} size {size!r} is not one of TiTok's {', '.join(HEADS)}, so its number of attention heads is unknown; pass {flag} N.")


def _pixel_decoder(state: dict[str, torch.Tensor], src: Path) -> dict[str, Any]:
    """MaskGIT-VQGAN decoder sizes from its shapes (level i's width = channels * channel_mult[i])."""
    codebook = shape(state, "pixel_quantize.embedding.weight", str(src), WHAT)
    widths = [int(shape(state, f"pixel_decoder.up.{i}.block.0.conv1.weight", str(src), WHAT)[0])
              for i in range(count(state, "pixel_decoder.up."))]
    if not widths or any(width % widths[0] for width in widths):
        raise VistokError(f"{src}'s pixel_decoder levels have widths {widths}, not multiples of the finest level's; pass an unmodified two-stage TiTok checkpoint.")
    return {
        "arch": "maskgit_vqgan",
        "codebook_size": int(codebook[0]),
        "dim": int(codebook[1]),
        "channels": widths[0],
        "channel_mult": [width // widths[0] for width in widths],
        "num_res_blocks": count(state, "pixel_decoder.up.0.block."),
    }


def convert(src: Path, args: argparse.Namespace) -> Imported:
    from vistok.tokenizers.model import build_tokenizer

    state, config, weights = _read_source(src, args.config)
    vq = config["model"]["vq_model"]
    num_tokens, width = (int(n) for n in shape(state, "latent_tokens", str(src), WHAT))
    patch_size = int(shape(state, "encoder.patch_embed.weight", str(src), WHAT)[-1])
    grid = round((int(shape(state, "encoder.positional_embedding", str(src), WHAT)[0]) - 1) ** 0.5)
    image_size = grid * patch_size
    crop = (config.get("dataset") or {}).get("preprocessing", {}).get("crop_size")
    if crop is not None and int(crop) != image_size:
        raise VistokError(f"{src}'s config says crop_size {crop} but its positional embeddings fit {image_size}x{image_size} images; pass the config published with these weights.")
    token_size = int(shape(state, "decoder.decoder_embed.weight", str(src), WHAT)[1])
    mode = vq.get("quantize_mode", "vq")
    legacy = bool(vq.get("is_legacy", True))
    two_stage = any(k.startswith("pixel_decoder.") for k in state)
    if "decoder.ffn.2.weight" in state and not two_stage:
        raise VistokError(f"{src} is a stage-1 TiTok (its decoder predicts proxy codes) without the pixel decoder; pass a stage-2 checkpoint, whose pixel_decoder.* tensors decode images.")
    if mode == "vq":
        codebook = shape(state, "quantize.embedding.weight", str(src), WHAT)
        quantizer = {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": token_size,
                     "codebook_size": int(codebook[0]), "use_cosine": bool(vq.get("use_l2_norm", False)),
                     "commitment_weight": float(vq.get("commitment_cost", 0.25))}
    elif mode == "vae":
        quantizer = {"_target_": "vistok.tokenizers.quantizers.DiagonalGaussian", "dim": token_size}
    else:
        raise VistokError(f"{src}'s quantize_mode {mode!r} is not supported by the titok import (it reads 'vq' and 'vae').")
    tokenizer = build_tokenizer(
        arch="titok_original", preset="tiny", image_size=image_size, quantizer=quantizer, num_tokens=num_tokens,
        patch_size=patch_size, width=width, depth=count(state, "encoder.transformer."),
        heads=_heads(vq.get("vit_enc_model_size"), args.heads, "encoder", src),
        decoder_width=int(shape(state, "decoder.class_embedding", str(src), WHAT)[-1]),
        decoder_depth=count(state, "decoder.transformer."),
        decoder_heads=_heads(vq.get("vit_dec_model_size"), args.decoder_heads if args.decoder_heads is not None else args.heads, "decoder", src),
        legacy_reshape=legacy, pixel_decoder=_pixel_decoder(state, src) if two_stage else None,
    )
    renamed = rename_keys(state, RULES + (PROXY_HEAD if two_stage else SINGLE_STAGE_HEAD), str(weights), "titok")
    load_weights(tokenizer, renamed, str(weights), "titok")
    notes = [
        f"TiTok {vq.get('vit_enc_model_size')}/{vq.get('vit_dec_model_size')} encoder/decoder, {num_tokens} tokens, "
        f"{'VAE' if mode == 'vae' else 'VQ'}{' with l2-normalised codes' if quantizer.get('use_cosine') else ''}, "
        f"{'two-stage (soft proxy codes through the MaskGIT-VQGAN decoder)' if two_stage else 'single-stage'}"
        f"{', legacy token/channel reshape' if legacy else ''}.",
        "Input and output pixels keep TiTok's [0, 1] convention inside the model; vistok's API is unchanged.",
    ]
    if mode == "vae":
        notes.append("encode() returns the posterior mean (TiTok samples); decode() takes those continuous tokens.")
    return Imported(tokenizer, {"format": "titok", "file": src.name, "repository": REPOSITORY, "weights": "raw", "notes": notes})
