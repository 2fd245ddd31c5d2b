"""TiTok as released by its authors (Yu et al., 2024, bytedance/1d-tokenizer): the layout its
checkpoints need, built from vistok's transformer blocks.

It is the same method as :mod:`~vistok.tokenizers.transformer` (K learned latent tokens read the
image patches; mask queries read the tokens back), with the original's layout choices:

- a learned class token in front of the patches (encoder) and of the mask queries (decoder),
  sharing their positional embedding table; its output is dropped;
- LayerNorms ``ln_pre`` on the whole sequence before the first block and ``ln_post`` on the kept
  outputs; one shared ``mask_token`` as the query of every grid cell;
- the encoder's output projection is a 1x1 conv over a (width, K) map. ``legacy_reshape``
  reproduces the released two-stage models (titok_l32 / b64 / s128), which *reshape* the (K, width)
  outputs into that map instead of transposing them: channel c at position n is element
  ``c * K + n`` of the row-major (K, width) matrix, mixing tokens and channels;
- decoder heads: ``pixel_decoder=None``: a 1x1 conv to patch pixels, depth-to-space, then a 3x3
  conv (single-stage models); a pixel_decoder config: logits over a 2D VQ model's codebook for
  every grid cell (proxy codes), decoded *softly*: ``softmax(logits) @ codebook`` goes through that
  model's decoder (two-stage models; the released ones use the MaskGIT-VQGAN decoder of
  :mod:`~vistok.tokenizers.maskgit_vqgan`, and vistok's two-stage training any 2D VQ tokenizer).

Images come in and go out on TiTok's [0, 1] scale inside the modules, so the weights are used
unchanged; :class:`~vistok.tokenizers.model.ImageTokenizer` sees vistok's [-1, 1] convention.
A prefix of k < K tokens decodes as in the original (the decoder attends only to the first k).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.maskgit_vqgan import MaskGITDecoder
from vistok.tokenizers.token_dropout import keep_mask
from vistok.tokenizers.transformer import init_vit_weights, make_blocks, run_blocks, unpatchify

# TiTok's size table (modeling/modules/blocks.py). "tiny" is the reference fixtures' extra entry.
PRESETS: dict[str, dict[str, Any]] = {
    name: {"width": width, "depth": depth, "heads": heads, "mlp_ratio": 4.0, "patch_size": 16, "num_tokens": tokens,
           "legacy_reshape": False, "pixel_decoder": None}
    for name, width, depth, heads, tokens in [
        ("tiny", 64, 2, 4, 32), ("small", 512, 8, 8, 128), ("base", 768, 12, 12, 64), ("large", 1024, 24, 16, 32)]
}
OVERRIDES = ("width", "depth", "heads", "mlp_ratio", "decoder_width", "decoder_depth", "decoder_heads",
             "legacy_reshape", "pixel_decoder")


class OriginalTiTokEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, K, out_dim)."""

    def __init__(self, image_size: int, patch_size: int, num_tokens: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, out_dim: int, legacy_reshape: bool) -> None:
        super().__init__()
        self.legacy_reshape = legacy_reshape
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=width)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.patch_embed.num_patches + 1, width))
        self.latent_tokens = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.latent_pos_embed = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = make_blocks(width, depth, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)  # the original's 1x1 conv_out
        self.apply(init_vit_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed((images + 1) / 2)  # TiTok reads [0, 1] pixels
        b, num_patches = patches.shape[:2]
        x = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1) + self.pos_embed
        latents = (self.latent_tokens + self.latent_pos_embed).expand(b, -1, -1)
        x = run_blocks(self.blocks, self.ln_pre(torch.cat([x, latents], dim=1)))
        x = self.ln_post(x[:, 1 + num_patches:])  # (B, K, width)
        if self.legacy_reshape:
            x = x.reshape(b, x.shape[2], x.shape[1]).transpose(1, 2)
        return self.proj(x)


class OriginalTiTokDecoder(nn.Module):
    """Tokens (B, k, in_dim), 1 <= k <= K -> image (B, 3, H, W) in about [-1, 1] (unclamped).

    With a ``pixel_decoder`` (and its ``pixel_quantizer`` codebook) the transformer predicts proxy
    codes instead: :meth:`proxy_logits` gives them, and the image is that decoder's output for
    the soft codes ``softmax(logits) @ codebook``.
    """

    def __init__(self, image_size: int, patch_size: int, num_tokens: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, in_dim: int, pixel_quantizer: nn.Module | None = None,
                 pixel_decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.patch_size, self.num_tokens = patch_size, num_tokens
        self.grid = image_size // patch_size
        scale = width ** -0.5
        self.proj_in = nn.Linear(in_dim, width)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.grid * self.grid + 1, width))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.latent_pos_embed = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = make_blocks(width, depth, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.pixel_quantizer, self.pixel_decoder = pixel_quantizer, pixel_decoder
        if pixel_decoder is None:
            self.head = nn.Linear(width, patch_size * patch_size * 3)  # the original's 1x1 conv ffn
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        else:
            # the original's ffn: 1x1 conv -> tanh -> 1x1 conv to one logit per proxy code
            self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(),
                                      nn.Linear(2 * width, pixel_quantizer.codebook_size))
        self.apply(init_vit_weights)
        for p in (self.class_embedding, self.pos_embed, self.mask_token, self.latent_pos_embed):
            trunc_normal_(p, std=0.02)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight nearest the pixels (the adaptive GAN weight balances gradients at it)."""
        return self.conv_out.weight if self.pixel_decoder is None else self.pixel_decoder.last_layer

    def features(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, k, in_dim) -> per-grid-cell features (B, g*g, width)."""
        b, k = tokens.shape[:2]
        num_queries = 1 + self.grid * self.grid
        attn_mask = None
        if lengths is not None:
            keep = keep_mask(b, k, k, lengths, tokens.device)
            # hidden inputs are zeroed too, so not even their gradients (0 * NaN) reach the projection
            tokens = torch.where(keep[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
            # a hidden token is a key nobody attends to: exactly the original's shorter sequence
            attn_mask = torch.cat([keep.new_ones(b, num_queries), keep], dim=1)[:, None, None, :]
        latents = self.proj_in(tokens) + self.latent_pos_embed[:k]
        queries = torch.cat([self.class_embedding.expand(b, 1, -1), self.mask_token.expand(b, self.grid * self.grid, -1)], dim=1)
        x = torch.cat([queries + self.pos_embed, latents], dim=1)
        x = run_blocks(self.blocks, self.ln_pre(x), None if attn_mask is None else itertools.repeat(attn_mask))
        return self.ln_post(x[:, 1:num_queries])

    def proxy_logits(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, k, in_dim) -> (B, g*g, codebook_size) logits over the pixel decoder's codes, raster order."""
        if self.pixel_decoder is None:
            raise VistokError("this TiTok decoder predicts pixels, not proxy codes; use a two-stage (pixel_decoder) TiTok.")
        return self.head(self.features(tokens, lengths))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, k, in_dim); lengths: optional (B,) long tokens kept per sample."""
        if self.pixel_decoder is None:
            pixels = self.conv_out(unpatchify(self.head(self.features(tokens, lengths)), self.grid, self.patch_size))
            return pixels * 2 - 1  # TiTok's [0, 1] -> vistok's [-1, 1]
        return self.decode_proxy(self.proxy_logits(tokens, lengths).softmax(dim=-1))

    def decode_proxy(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, g*g, codebook_size) weights over the pixel codebook (soft, or one-hot hard codes)
        -> image (B, 3, H, W) about [-1, 1] through the pixel decoder."""
        codes = self.pixel_quantizer.codes()
        # a mix of codes maps out like the codes (project_out is affine and the weights sum to 1)
        pixels = self.pixel_decoder(self.pixel_quantizer.project_out(weights @ codes))
        return pixels * 2 - 1 if getattr(self.pixel_decoder, "unit_range_output", False) else pixels


def build_pixel_stage(config: Mapping[str, Any]) -> tuple[nn.Module, nn.Module]:
    """The codebook (a quantizer) and decoder proxy codes are decoded through.

    ``config``: ``{"arch": "maskgit_vqgan", "codebook_size", "dim", "channels", "channel_mult",
    "num_res_blocks"}`` (the released two-stage TiTok), or ``{"tokenizer": <build_tokenizer
    config of a 2D VQ tokenizer>}`` (a teacher; its encoder is not kept).
    """
    from vistok.tokenizers.model import build_tokenizer
    from vistok.tokenizers.quantizers import VectorQuantizer

    config = dict(config)
    if config.get("arch") == "maskgit_vqgan":
        known = {"arch", "codebook_size", "dim", "channels", "channel_mult", "num_res_blocks"}
        if set(config) != known:
            raise VistokError(f"a maskgit_vqgan pixel_decoder needs exactly the settings {', '.join(sorted(known))}; got {', '.join(sorted(config))}.")
        quantizer = VectorQuantizer(config["dim"], config["codebook_size"])
        decoder = MaskGITDecoder(config["dim"], config["channels"], config["channel_mult"], config["num_res_blocks"])
        return quantizer, decoder
    if set(config) == {"tokenizer"} and isinstance(config["tokenizer"], Mapping):
        teacher = build_tokenizer(**config["tokenizer"])
        if not teacher.is_discrete or not hasattr(teacher.quantizer, "codes") or teacher.arch == "titok":
            raise VistokError(f"a two-stage TiTok decodes through a 2D VQ tokenizer with a codebook; the teacher is {teacher.arch} / {type(teacher.quantizer).__name__}.")
        return teacher.quantizer, teacher.decoder
    raise VistokError(f"pixel_decoder must be null, {{'arch': 'maskgit_vqgan', ...}} or {{'tokenizer': <a 2D VQ tokenizer config>}}; got {config!r}.")


def build(image_size: int, patch_size: int, num_tokens: int, quantizer: nn.Module,
          settings: Mapping[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder of an original-layout TiTok (settings: see PRESETS; decoder_* filled in)."""
    pixel_quantizer = pixel_decoder = None
    if settings["pixel_decoder"] is not None:
        pixel_quantizer, pixel_decoder = build_pixel_stage(settings["pixel_decoder"])
    encoder = OriginalTiTokEncoder(image_size, patch_size, num_tokens, settings["width"], settings["depth"], settings["heads"],
                                   settings["mlp_ratio"], out_dim=quantizer.in_dim, legacy_reshape=bool(settings["legacy_reshape"]))
    decoder = OriginalTiTokDecoder(image_size, patch_size, num_tokens, settings["decoder_width"], settings["decoder_depth"],
                                   settings["decoder_heads"], settings["mlp_ratio"], in_dim=quantizer.dim,
                                   pixel_quantizer=pixel_quantizer, pixel_decoder=pixel_decoder)
    return encoder, decoder
