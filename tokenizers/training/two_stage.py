"""Two-stage TiTok training (Yu et al., 2024, "An Image is Worth 32 Tokens", sec. 3.3).

A 1D tokenizer is hard to train on pixels from scratch; TiTok's authors first train it against a
2D VQ model (the *teacher*, MaskGIT's VQGAN in the paper):

- stage 1 (``loss.proxy_weight > 0``): the 1D decoder predicts, for every cell of the teacher's
  grid, logits over the teacher's codebook; the loss is the cross-entropy against the teacher's
  own code for that cell (the *proxy code*) plus the quantizer's loss. No pixels are decoded.
- stage 2 (pixel losses, ``init_from`` the stage-1 run, ``freeze=[encoder, quantizer]``): the
  decoder's soft proxy codes, ``softmax(logits) @ teacher codebook``, go through the teacher's
  pixel decoder, and the 1D decoder and that pixel decoder are fine-tuned with the usual pixel
  losses.

The 1D tokenizer is arch ``titok_original`` with ``pixel_decoder = {"tokenizer": <the teacher's
config>}``: :func:`with_teacher` writes that into the model config and :func:`copy_teacher`
copies the teacher's codebook and decoder into it, so the checkpoint and the export are
self-contained. The teacher itself only encodes targets and is never saved or trained.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers import QuantizerOutput


@dataclass
class ProxyOutput:
    """Stage 1's forward: the quantizer's output, the kept lengths, the loss and top-1 accuracy."""

    quantizer: QuantizerOutput
    lengths: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor
    perturbed: torch.Tensor | None = None


def load_teacher(path: str | os.PathLike):
    """The teacher tokenizer at ``path`` (an export or checkpoint), frozen, in eval mode.

    It must be a 2D VQ tokenizer: discrete codes with a codebook, one token per grid cell.
    """
    from vistok.tokenizers.export import load

    teacher = load(path)
    if teacher.arch in ("titok", "titok_original") or not teacher.is_discrete or not hasattr(teacher.quantizer, "codes"):
        raise VistokError(f"teacher {path} is a {teacher.arch} / {type(teacher.quantizer).__name__} tokenizer; a two-stage TiTok "
                          "learns a 2D VQ tokenizer's codes (conv, llamagen, an imported MaskGIT-VQGAN...), so pass one of those.")
    return teacher.requires_grad_(False).eval()


def with_teacher(tokenizer: Mapping[str, Any], teacher) -> dict[str, Any]:
    """The ``build_tokenizer`` config ``tokenizer`` with the teacher as its pixel decoder."""
    if tokenizer.get("arch") != "titok_original":
        raise VistokError(f"a teacher trains a two-stage TiTok (model=titok_original), not arch {tokenizer.get('arch')!r}; "
                          "use experiment=titok_two_stage or set teacher=null.")
    if tokenizer.get("pixel_decoder") is not None:
        raise VistokError("model.pixel_decoder is set and a teacher is given; the teacher is the pixel decoder, so set model.pixel_decoder=null.")
    return {**tokenizer, "pixel_decoder": {"tokenizer": teacher.config}}


def copy_teacher(tokenizer, teacher) -> None:
    """Copy the teacher's codebook and decoder into the 1D tokenizer's pixel stage (checking the grids agree)."""
    grid = tokenizer.decoder.grid
    if teacher.image_size != tokenizer.image_size or teacher.max_tokens != grid * grid:
        raise VistokError(
            f"the teacher takes {teacher.image_size}px images as {teacher.max_tokens} tokens, but the TiTok decoder predicts a "
            f"{grid}x{grid} grid of {tokenizer.image_size}px images; set model.image_size and model.patch_size so that "
            f"(image_size / patch_size)^2 = {teacher.max_tokens} at the teacher's image size {teacher.image_size}.")
    tokenizer.decoder.pixel_quantizer.load_state_dict(teacher.quantizer.state_dict())
    tokenizer.decoder.pixel_decoder.load_state_dict(teacher.decoder.state_dict())


def proxy_forward(tokenizer, teacher, images: torch.Tensor, step: int | None = None) -> ProxyOutput:
    """Stage 1: images (B, 3, H, W) in [0, 1] -> cross-entropy of the 1D decoder's proxy-code logits
    against the teacher's codes (mean over cells), as TiTok's stage-1 loss. A configured token
    perturbation applies here as in the forward pass (``step`` sets its warm-up)."""
    if next(teacher.parameters()).device != images.device:
        teacher.to(images.device)
    with torch.no_grad():
        targets = teacher.encode(images)  # (B, g*g) raster order
    quantized = tokenizer.quantizer(tokenizer.encoder(images * 2 - 1))
    lengths = None
    if tokenizer.token_dropout is not None:
        lengths = tokenizer.token_dropout.sample(images.shape[0], tokenizer.max_tokens, images.device)
    codes, perturbed = quantized.quantized, None
    if tokenizer.training and tokenizer.token_perturb is not None:
        codes, perturbed = tokenizer.token_perturb(tokenizer.quantizer, codes, quantized.indices, step)
    logits = tokenizer.decoder.proxy_logits(codes, lengths)  # (B, g*g, codes)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    accuracy = (logits.argmax(-1) == targets).float().mean().detach()
    if lengths is None:
        lengths = torch.full((images.shape[0],), tokenizer.max_tokens, dtype=torch.long, device=images.device)
    return ProxyOutput(quantized, lengths, loss, accuracy, perturbed)
