"""1D transformer encoder and decoder in the style of TiTok (Yu et al., 2024).

The encoder reads image patches together with K learned latent tokens and keeps only the
latent outputs, so an image becomes a 1D sequence of K tokens whose order carries no spatial
meaning. The decoder asks one mask query per image patch to read those tokens back into pixels.
Both use timm's ViT ``Block`` with attention forced through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.token_dropout import keep_mask, pad_with_mask_token

# How the decoder's patch queries become pixels; see pixel_head.
DECODER_HEADS = ("linear", "conv", "upsample")
# Default initial std of the encoder's patch position embeddings (ViT's; see TiTokEncoder).
ENCODER_POS_STD = 0.02


def make_blocks(width: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    """``depth`` pre-norm timm ViT blocks whose attention runs through SDPA."""
    if width % heads != 0:
        raise ValueError(f"width {width} must be divisible by heads {heads}")
    blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])
    for module in blocks.modules():
        if isinstance(module, Attention):
            # timm turns the fused path off under TIMM_FUSED_ATTN=0 or in exportable mode; the
            # manual path materialises (N x N) attention maps per head, which we never want here.
            module.fused_attn = True
    return blocks


def attention_bias(depth: int, heads: int, length: int, std: float | None) -> nn.Parameter | None:
    """A learned bias (depth, heads, L, L) added to every attention logit over a fixed sequence of L
    positions, drawn at ``std``; None when ``std`` is None (TiTok's blocks, no bias).

    At ViT's initialisation every query scores every key about equally, so each latent token pools the
    same average of all patches and each patch query reads the same average of all tokens: the model
    starts as one flat colour per image and leaves that only once Q.K products have learnt where
    things are (1,000-1,500 steps at rd32's scale). A random bias gives every latent token its own
    spatial footprint from the first step, and the bias itself learns routing directly, not through
    the product of two small matrices (docs/rd32.md).
    """
    if std is None:
        return None
    bias = nn.Parameter(torch.zeros(depth, heads, length, length))
    nn.init.normal_(bias, std=std)
    return bias


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, masks: Iterable[torch.Tensor | None] | None = None,
               rows: slice | None = None) -> torch.Tensor:
    """``x`` (B, L, width) through ``blocks``; block i's attention takes ``masks[i]`` (SDPA's ``attn_mask``:
    boolean keep-mask or additive float bias, broadcastable to (B, heads, L, L)), e.g. one row of
    :func:`attention_bias` per block, or ``itertools.repeat(mask)`` for the same mask everywhere.

    ``rows``: return only ``output[:, rows]``, and let the last block compute only those rows
    (their queries, attention outputs and MLP; keys and values still come from every position).
    The result is the same; the decoder keeps 16 of its 80 positions, so this skips most of its
    last block.
    """
    masks = [None] * len(blocks) if masks is None else list(itertools.islice(masks, len(blocks)))
    full = len(blocks) if rows is None else len(blocks) - 1  # blocks that compute every row
    for block, mask in zip(list(blocks)[:max(full, 0)], masks):
        x = block(x, attn_mask=mask)
    if rows is None:
        return x
    return x[:, rows] if len(blocks) == 0 else block_rows(blocks[-1], x, rows, masks[-1])


def block_rows(block: Block, x: torch.Tensor, rows: slice, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``block(x, attn_mask=mask)[:, rows]`` for a timm ViT :class:`Block`, computing only those rows:
    x (B, L, width) -> (B, len(rows), width)."""
    attn = block.attn
    if getattr(attn, "gate", None) is not None:  # timm's gated attention; vistok's blocks never set it
        return block(x, attn_mask=mask)[:, rows]
    heads, head_dim = attn.num_heads, attn.head_dim
    dim = heads * head_dim
    h = block.norm1(x)
    b, n, _ = h.shape
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, rows], weight[:dim], None if bias is None else bias[:dim])
    m = q.shape[1]
    q = attn.q_norm(q.reshape(b, m, heads, head_dim).transpose(1, 2))
    kv = F.linear(h, weight[dim:], None if bias is None else bias[dim:])
    k, v = kv.reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, attn.k_norm(k), v, attn_mask=None if mask is None else mask[..., rows, :],
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(b, m, dim)
    out = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(out)))
    y = x[:, rows] + block.drop_path1(block.ls1(out))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def init_vit_weights(module: nn.Module) -> None:
    """timm ViT initialisation: trunc_normal(0.02) linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def unpatchify(patches: torch.Tensor, grid: int, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(B, grid*grid, p*p*C) raster-ordered patches -> (B, C, grid*p, grid*p) image or feature map."""
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * patch_size, grid * patch_size)


class ConvRefine(nn.Sequential):
    """Residual 3x3 conv block without normalisation, then a 3x3 conv to RGB: (B, C, H, W) -> (B, 3, H, W).

    No GroupNorm, unlike VQGAN's blocks: on a few channels at a few pixels it acts as an instance
    norm and erases each image's mean colour, which the tokens then cannot bring back (the
    tokenizer collapses to one code). The block's second conv starts at zero, so the head starts
    as a per-pixel linear map of the features and learns the cross-patch part.
    """

    def __init__(self, channels: int) -> None:
        block = nn.Sequential(nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                              nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(block[-1].weight)
        nn.init.zeros_(block[-1].bias)
        super().__init__(block, nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](x + self[0](x))


def pixel_head(kind: str, width: int, patch_size: int, channels: int) -> tuple[nn.Linear, nn.Sequential]:
    """The decoder's output head: (linear map per patch query, convolutions over the image).

    ``"linear"``: one linear map per patch to its p*p*3 pixels (TiTok's layout; nothing crosses a
    patch border, so patches come out as separate blocks); the convolutions are empty.
    ``"conv"``: a linear map to p*p*C features per patch, then :class:`ConvRefine` over the whole
    image, which lets neighbouring patches agree at their borders.
    ``"upsample"``: each query gives one C*2^octaves-channel feature vector of the g x g grid; per
    octave a nearest 2x upsampling and a 3x3 conv halve the channels (a 2D conv decoder behind
    the 1D tokens), then :class:`ConvRefine` at full resolution. Needs a power-of-two patch size.
    """
    if kind not in DECODER_HEADS:
        raise VistokError(f"unknown decoder_head {kind!r}; use one of {', '.join(DECODER_HEADS)}.")
    if kind == "linear":
        return nn.Linear(width, patch_size * patch_size * 3), nn.Sequential()
    if kind == "conv":
        return nn.Linear(width, patch_size * patch_size * channels), ConvRefine(channels)
    octaves = patch_size.bit_length() - 1
    if patch_size != 1 << octaves:
        raise VistokError(f"decoder_head 'upsample' needs a power-of-two patch_size, got {patch_size}; use decoder_head 'conv' or a patch_size of 2, 4, 8, ...")
    layers: list[nn.Module] = []
    for i in range(octaves, 0, -1):
        layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(channels << i, channels << (i - 1), 3, padding=1), nn.GELU()]
    layers.append(ConvRefine(channels))
    return nn.Linear(width, channels << octaves), nn.Sequential(*layers)


class TiTokEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latent tokens (B, K, out_dim).

    Args:
        image_size: H = W in pixels (a multiple of ``patch_size``).
        patch_size: side of the square patches.
        num_tokens: K, the number of learned latent tokens (the output sequence length).
        width, depth, heads, mlp_ratio: transformer size.
        out_dim: D, the quantizer's input dimension.
        pos_std: initial std of the patch position embeddings. ViT's 0.02 is the default. Tiny models
            train faster from 0.5, the scale of the patch embeddings (about 0.3 per channel): at 0.02 the
            pre-norm blocks barely see where a patch is, near-uniform attention pools a bag of patches,
            and they sit for a thousand steps at one flat colour per image (docs/rd32.md).
        attn_bias_std: None (TiTok) or the initial std of a learned attention bias per block and head
            over the patches + latent tokens (see :func:`attention_bias`).
    """

    def __init__(self, image_size: int, patch_size: int, num_tokens: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, out_dim: int, pos_std: float = ENCODER_POS_STD,
                 attn_bias_std: float | None = None) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.num_tokens = image_size, patch_size, num_tokens
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=width)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        self.latent_tokens = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.blocks = make_blocks(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

        self.apply(init_vit_weights)
        self.attn_bias = attention_bias(depth, heads, num_patches + num_tokens, attn_bias_std)
        for p, std in ((self.pos_embed, pos_std), (self.latent_tokens, 0.02), (self.latent_pos_embed, 0.02)):
            trunc_normal_(p, std=std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images) + self.pos_embed
        latents = (self.latent_tokens + self.latent_pos_embed).expand(images.shape[0], -1, -1)
        x = run_blocks(self.blocks, torch.cat([patches, latents], dim=1), self.attn_bias,
                       rows=slice(patches.shape[1], None))
        x = self.norm(x)
        return self.proj(x)


class TiTokDecoder(nn.Module):
    """Tokens (B, k, in_dim), 1 <= k <= K -> image (B, 3, H, W) in about [-1, 1] (unclamped).

    Positions k..K-1, and positions >= ``lengths[b]`` when given, are replaced by a learned mask
    token after the input projection, so nothing of those tokens reaches the blocks. The
    sequence is [one mask query per image patch (+ patch position)] + [K latent slots
    (+ latent position)]; full bidirectional attention is safe because hidden slots carry only
    the mask token. The patch queries' outputs become pixels through ``head`` (see
    :func:`pixel_head`; ``head_channels`` is its C). ``attn_bias_std``: as in :class:`TiTokEncoder`.
    """

    def __init__(self, image_size: int, patch_size: int, num_tokens: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, in_dim: int, head: str = "linear", head_channels: int = 16,
                 attn_bias_std: float | None = None) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.num_tokens = image_size, patch_size, num_tokens
        self.grid = image_size // patch_size
        self.head_kind = head
        num_patches = self.grid * self.grid
        self.proj_in = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.patch_query = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        self.blocks = make_blocks(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.head, self.refine = pixel_head(head, width, patch_size, head_channels)

        self.apply(init_vit_weights)
        for p in (self.mask_token, self.latent_pos_embed, self.patch_query, self.pos_embed):
            trunc_normal_(p, std=0.02)
        self.attn_bias = attention_bias(depth, heads, num_patches + num_tokens, attn_bias_std)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight that outputs pixels (the adaptive GAN weight balances gradients at it)."""
        convs = [m for m in self.refine.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].weight if convs else self.head.weight

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, k, in_dim); lengths: optional (B,) long tokens kept per sample."""
        if lengths is not None:
            # zero hidden inputs before the projection too, so not even their gradients
            # (0 * NaN) can reach the projection weights
            keep = keep_mask(tokens.shape[0], tokens.shape[1], tokens.shape[1], lengths, tokens.device)
            tokens = torch.where(keep[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        latents = pad_with_mask_token(self.proj_in(tokens), self.mask_token, self.num_tokens, lengths)
        latents = latents + self.latent_pos_embed
        queries = (self.patch_query + self.pos_embed).expand(tokens.shape[0], -1, -1)
        x = run_blocks(self.blocks, torch.cat([queries, latents], dim=1), self.attn_bias, rows=slice(queries.shape[1]))
        return self.to_pixels(self.norm(x))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The output head alone: patch-query outputs (B, grid*grid, width) -> (B, 3, H, W), unclamped."""
        x = self.head(x)
        if self.head_kind == "upsample":
            return self.refine(unpatchify(x, self.grid, 1, x.shape[-1]))
        return self.refine(unpatchify(x, self.grid, self.patch_size, x.shape[-1] // self.patch_size**2))
