"""The image tokenizer: encoder -> quantizer -> (token perturbation and tail-token dropout, training only) -> decoder.

:func:`build_tokenizer` assembles one from an architecture (``"titok"``: 1D, ``"conv"``: 2D),
a size preset, a quantizer config and overrides. The resulting :class:`ImageTokenizer` carries a
plain JSON-able ``config`` such that ``build_tokenizer(**tokenizer.config)`` rebuilds the same
architecture, which is what checkpoints and exports store.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vistok.tokenizers import llamagen, magvit2, titok_original
from vistok.tokenizers.conv import ConvDecoder, ConvEncoder
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers import Quantizer, QuantizerOutput, build_quantizer
from vistok.tokenizers.token_dropout import TailTokenDropout
from vistok.tokenizers.token_perturb import TokenPerturbation
from vistok.tokenizers.transformer import ENCODER_POS_STD, TiTokDecoder, TiTokEncoder

# Sizes follow TiTok S/B/L (patch 16 at 256 px; default K = 128/64/32 as in the paper's
# S-128, B-64, L-32) and VQGAN f8/f16. "tiny" presets train on a CPU at 16-32 px.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "titok": {
        "tiny": {"width": 64, "depth": 2, "heads": 4, "mlp_ratio": 4.0, "patch_size": 4, "num_tokens": 16},
        "small": {"width": 512, "depth": 8, "heads": 8, "mlp_ratio": 4.0, "patch_size": 16, "num_tokens": 128},
        "base": {"width": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0, "patch_size": 16, "num_tokens": 64},
        "large": {"width": 1024, "depth": 24, "heads": 16, "mlp_ratio": 4.0, "patch_size": 16, "num_tokens": 32},
    },
    "conv": {
        "tiny": {"channels": 16, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 1, "mid_attention": False},
        "f8": {"channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2, "mid_attention": True},
        "f16": {"channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "mid_attention": True},
    },
}

# Settings an override may change, besides those named in build_tokenizer's signature.
# decoder_* default to the encoder's value (TiTok uses a decoder of the encoder's size).
OVERRIDES = {
    "titok": ("width", "depth", "heads", "mlp_ratio", "decoder_width", "decoder_depth", "decoder_heads",
              "decoder_patch_size", "decoder_head", "decoder_head_channels", "encoder_pos_std", "attn_bias_std"),
    "conv": ("channels", "channel_mult", "num_res_blocks", "mid_attention", "dropout"),
}

# Published 2D tokenizers (``vistok import``): modules with PRESETS, OVERRIDES and
# build(image_size, dim, settings) -> (encoder, decoder). Their decoders have
# no mask token, so they decode the full grid only (no token dropout, no prefixes).
NAMED_ARCHS = {"llamagen": llamagen, "open_magvit2": magvit2}
for _name, _module in NAMED_ARCHS.items():
    PRESETS[_name] = _module.PRESETS
    OVERRIDES[_name] = _module.OVERRIDES

# TiTok in its authors' layout (``vistok import titok``, two-stage training): the "titok" settings
# plus legacy_reshape and pixel_decoder; see vistok.tokenizers.titok_original.
PRESETS["titok_original"] = titok_original.PRESETS
OVERRIDES["titok_original"] = titok_original.OVERRIDES

PERTURB_SETTINGS = ("rate", "p", "kind", "k", "warmup_steps")
DEFAULT_QUANTIZER = {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [8, 5, 5, 5]}


@dataclass
class TokenizerOutput:
    """Result of :meth:`ImageTokenizer.forward`.

    reconstruction: (B, 3, H, W) float on the [0, 1] scale, not clamped (for losses).
    quantizer: the quantizer's output for all K tokens (loss, stats, indices).
    lengths: (B,) long, how many leading tokens the decoder saw per sample.
    perturbed: (B, K) bool, the tokens replaced by other codes (token perturbation), or None when
        nothing was perturbed (eval mode, or no perturbation configured).
    """

    reconstruction: torch.Tensor
    quantizer: QuantizerOutput
    lengths: torch.Tensor
    perturbed: torch.Tensor | None = None


class ImageTokenizer(nn.Module):
    """Images (B, 3, H, W) in [0, 1] <-> K tokens, discrete indices or soft codes.

    Attributes:
        arch: ``"titok"`` (1D sequence) or ``"conv"`` (2D grid in raster order).
        image_size: H = W the model takes.
        max_tokens: K, tokens per image.
        patch_size / downsample: pixels per patch side (titok) or the encoder's downsampling
            factor (conv); the same number under both names.
        codebook_size: number of codes, None for soft tokens.
        token_dim: D, the dimension of a token's code vector.
        is_discrete: True when tokens are long indices.
        config: plain dict; ``build_tokenizer(**config)`` rebuilds this architecture.
    """

    def __init__(self, encoder: nn.Module, quantizer: Quantizer, decoder: nn.Module, *, arch: str, image_size: int,
                 max_tokens: int, patch_size: int, token_dropout: TailTokenDropout | None,
                 config: Mapping[str, Any], token_perturb: TokenPerturbation | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder
        self.token_dropout = token_dropout
        self.token_perturb = token_perturb
        self.arch = arch
        self.image_size = image_size
        self.max_tokens = max_tokens
        self.patch_size = self.downsample = patch_size
        self._config = copy.deepcopy(dict(config))

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    @property
    def codebook_size(self) -> int | None:
        return self.quantizer.codebook_size

    @property
    def token_dim(self) -> int:
        return self.quantizer.dim

    @property
    def is_discrete(self) -> bool:
        return self.quantizer.codebook_size is not None

    def forward(self, images: torch.Tensor, num_tokens: int | torch.Tensor | None = None,
                step: int | None = None) -> TokenizerOutput:
        """Encode, quantize and decode a prefix of the tokens.

        images: (B, 3, H, W) in [0, 1]. num_tokens: an int k (every sample keeps k tokens), a (B,)
        long tensor of per-sample lengths, or None: in training mode the token dropout's sampled
        lengths (all K when there is none), in eval mode all K. step: the training step, which sets
        the token dropout's steps and the token perturbation's warm-up (None: dropout on, warm-up over); in training mode only, a configured
        perturbation replaces some tokens' codes before decoding.
        """
        self._check_images(images)
        quantized = self.quantizer(self.encoder(images * 2 - 1))
        codes, perturbed = quantized.quantized, None
        if self.training and self.token_perturb is not None:
            codes, perturbed = self.token_perturb(self.quantizer, codes, quantized.indices, step)
        batch_size = images.shape[0]
        if num_tokens is None:
            if self.training and self.token_dropout is not None:
                lengths = self.token_dropout.sample(batch_size, self.max_tokens, images.device, step=step)
            else:
                lengths = torch.full((batch_size,), self.max_tokens, dtype=torch.long, device=images.device)
        elif isinstance(num_tokens, torch.Tensor):
            lengths = self._check_lengths(num_tokens, batch_size).to(images.device)
        else:
            k = self._check_num_tokens(num_tokens)
            lengths = torch.full((batch_size,), k, dtype=torch.long, device=images.device)
        reconstruction = (self.decoder(codes, lengths) + 1) / 2
        return TokenizerOutput(reconstruction, quantized, lengths, perturbed)

    def encode(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> the first k tokens (k = num_tokens, default K).

        Returns (B, k) long indices for discrete quantizers, (B, k, D) float codes for soft ones.
        """
        self._check_images(images)
        k = self.max_tokens if num_tokens is None else self._check_num_tokens(num_tokens)
        quantized = self.quantizer(self.encoder(images * 2 - 1))
        if self.is_discrete:
            return quantized.indices[:, :k]
        return quantized.quantized[:, :k]

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens -> images (B, 3, H, W) clamped to [0, 1].

        tokens: (B, k) long indices (discrete quantizers) or (B, k, D) float codes, 1 <= k <= K.
        lengths: optional (B,) long; sample b uses only its first ``lengths[b]`` tokens, so one
        batch may mix prefix lengths. Hidden positions are replaced by the learned mask token.
        """
        if not tokens.is_floating_point():
            if not self.is_discrete:
                raise VistokError("this tokenizer's tokens are soft codes (B, k, D) floats, not integer indices; pass what encode() returned.")
            if tokens.ndim != 2:
                raise VistokError(f"integer tokens must have shape (B, k), got {tuple(tokens.shape)}; pass what encode() returned.")
            self._check_prefix(tokens.shape[1])
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
                raise VistokError(f"token indices must lie in [0, {self.codebook_size}) for this codebook; pass indices produced by this tokenizer.")
            tokens = self.quantizer.indices_to_codes(tokens.long())
        return self.decode_codes(tokens, lengths).clamp(0, 1)

    def decode_codes(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, k, D) float, 1 <= k <= K -> reconstruction (B, 3, H, W), [0, 1] scale, unclamped."""
        if codes.ndim != 3 or codes.shape[-1] != self.token_dim:
            raise VistokError(f"codes must have shape (B, k, {self.token_dim}), got {tuple(codes.shape)}; pass tokens from this tokenizer.")
        self._check_prefix(codes.shape[1])
        if lengths is not None:
            lengths = self._check_lengths(lengths, codes.shape[0]).to(codes.device)
        return (self.decoder(codes, lengths) + 1) / 2

    # ---- input checks: user-facing, so they name the setting and the fix ----

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise VistokError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}; resize and crop images to {self.image_size}x{self.image_size} RGB first.")
        if not images.is_floating_point():
            raise VistokError(f"expected float images in [0, 1], got dtype {images.dtype}; convert with images.float() / 255.")

    def _check_num_tokens(self, num_tokens: int) -> int:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise VistokError(f"num_tokens must be an integer, got {num_tokens!r}.")
        self._check_prefix(num_tokens)
        return num_tokens

    def _check_prefix(self, k: int) -> None:
        if not 1 <= k <= self.max_tokens:
            raise VistokError(f"asked for {k} tokens, but this tokenizer uses 1 to {self.max_tokens} tokens per image; choose a number of tokens in that range.")
        if k < self.max_tokens and not self.decodes_prefixes:
            raise VistokError(f"asked for {k} tokens, but this {self.arch} tokenizer's 2D decoder has no mask token and decodes only its full grid of {self.max_tokens} tokens; use all {self.max_tokens}.")

    @property
    def decodes_prefixes(self) -> bool:
        """Whether any prefix of 1..K tokens decodes (False for grid decoders without a mask token)."""
        return getattr(self.decoder, "decodes_prefixes", True)

    def _check_lengths(self, lengths: torch.Tensor, batch_size: int) -> torch.Tensor:
        if lengths.shape != (batch_size,) or lengths.is_floating_point():
            raise VistokError(f"lengths must be a (B,) = ({batch_size},) integer tensor, got shape {tuple(lengths.shape)} and dtype {lengths.dtype}.")
        if batch_size and (int(lengths.min()) < 1 or int(lengths.max()) > self.max_tokens):
            raise VistokError(f"lengths must lie in [1, {self.max_tokens}]; got values from {int(lengths.min())} to {int(lengths.max())}.")
        return lengths.long()


def build_tokenizer(arch: str = "titok", preset: str = "tiny", image_size: int = 32,
                    quantizer: Mapping[str, Any] | Quantizer | None = None, num_tokens: int | None = None,
                    patch_size: int | None = None, token_dropout: Mapping[str, Any] | None = None,
                    token_perturb: Mapping[str, Any] | None = None, **overrides: Any) -> ImageTokenizer:
    """Build an :class:`ImageTokenizer` from a preset plus overrides.

    Args:
        arch: ``"titok"`` (1D transformer), ``"titok_original"`` (TiTok in its authors' layout), ``"conv"`` (2D VQGAN-style), or a published 2D
            architecture of ``NAMED_ARCHS`` (``"llamagen"``, ``"open_magvit2"``).
        preset: a key of ``PRESETS[arch]``.
        image_size: H = W in pixels; a multiple of the patch size (titok) or downsampling factor (conv).
        quantizer: a quantizer config (``{"_target_": "vistok.tokenizers.quantizers.FSQ", ...}``, see
            ``build_quantizer``) or a Quantizer module; default FSQ with levels [8, 5, 5, 5].
            The encoder's output dimension is the quantizer's ``in_dim`` (its ``dim``, or 2 * dim for
            DiagonalGaussian's mean and log-variance), the decoder's input dimension its ``dim``.
        num_tokens: K for titok (default from the preset). For conv K is fixed by the grid,
            (image_size / downsample)^2; a value given must equal it.
        patch_size: titok patch side (default from the preset); for conv it must be None or the
            downsampling factor.
        token_dropout: None (no tail-token dropout) or ``TailTokenDropout`` kwargs.
        token_perturb: None (no token perturbation) or ``TokenPerturbation`` kwargs (discrete tokens only).
        **overrides: titok: width, depth, heads, mlp_ratio, decoder_width, decoder_depth,
            decoder_heads, decoder_patch_size (the decoder's patch queries; default the encoder's
            patch_size), decoder_head (linear | conv | upsample, see
            :func:`~vistok.tokenizers.transformer.pixel_head`), decoder_head_channels, encoder_pos_std
            (initial std of the encoder's patch positions, default 0.02), attn_bias_std (initial std of a
            learned attention bias per block and head over the fixed sequence, default none); conv: channels,
            channel_mult, num_res_blocks, mid_attention, dropout;
            named architectures: their module's OVERRIDES.
    """
    if arch not in PRESETS:
        raise VistokError(f"unknown arch {arch!r}; use one of {', '.join(PRESETS)}.")
    if preset not in PRESETS[arch]:
        raise VistokError(f"unknown {arch} preset {preset!r}; use one of {', '.join(PRESETS[arch])}.")
    unknown = sorted(set(overrides) - set(OVERRIDES[arch]))
    if unknown:
        raise VistokError(f"unknown {arch} setting(s) {', '.join(unknown)}; the settings are {', '.join(OVERRIDES[arch])}.")
    _check_int("image_size", image_size, minimum=1)

    quantizer_module = quantizer if isinstance(quantizer, Quantizer) else build_quantizer(
        DEFAULT_QUANTIZER if quantizer is None else quantizer)
    dim = quantizer_module.dim
    settings = {**copy.deepcopy(PRESETS[arch][preset]), **{k: v for k, v in overrides.items() if v is not None}}

    if arch in ("titok", "titok_original"):
        preset_patch_size, preset_num_tokens = settings.pop("patch_size"), settings.pop("num_tokens")
        patch_size = preset_patch_size if patch_size is None else patch_size
        num_tokens = preset_num_tokens if num_tokens is None else num_tokens
        _check_int("patch_size", patch_size, minimum=1)
        _check_int("num_tokens", num_tokens, minimum=1)
        if image_size % patch_size:
            raise VistokError(f"image_size {image_size} is not a multiple of patch_size {patch_size}; choose an image_size divisible by {patch_size} or another patch_size.")
        for name in ("width", "depth", "heads"):
            _check_int(name, settings[name], minimum=1)
            settings[f"decoder_{name}"] = _setting(settings, f"decoder_{name}", settings[name])
            _check_int(f"decoder_{name}", settings[f"decoder_{name}"], minimum=1)
        for prefix in ("", "decoder_"):
            if settings[f"{prefix}width"] % settings[f"{prefix}heads"]:
                raise VistokError(f"{prefix}width {settings[f'{prefix}width']} is not divisible by {prefix}heads {settings[f'{prefix}heads']}; choose heads that divide the width.")
        settings["mlp_ratio"] = float(settings["mlp_ratio"])
        head = {"decoder_head": _setting(settings, "decoder_head", "linear", pop=True),
                "decoder_head_channels": _setting(settings, "decoder_head_channels", 16, pop=True)}
        _check_int("decoder_head_channels", head["decoder_head_channels"], minimum=1)
        if head["decoder_head"] == "linear" and overrides.get("decoder_head_channels") is not None:
            raise VistokError("decoder_head_channels sets the conv head, but decoder_head is linear; set decoder_head=conv (or upsample), or leave decoder_head_channels unset.")
        if head["decoder_head"] != "linear":
            # only then: configs (and so fingerprints) of linear-head tokenizers stay what they were
            settings.update(head)
        decoder_patch_size = _setting(settings, "decoder_patch_size", patch_size, pop=True)
        _check_int("decoder_patch_size", decoder_patch_size, minimum=1)
        if image_size % decoder_patch_size:
            raise VistokError(f"image_size {image_size} is not a multiple of decoder_patch_size {decoder_patch_size}; choose a decoder_patch_size that divides {image_size}.")
        if decoder_patch_size != patch_size:
            settings["decoder_patch_size"] = decoder_patch_size  # only then, as for decoder_head
        pos_std = _setting(settings, "encoder_pos_std", ENCODER_POS_STD, pop=True)
        if isinstance(pos_std, bool) or not isinstance(pos_std, (int, float)) or not 0 < pos_std <= 1:
            raise VistokError(f"encoder_pos_std must be a number in (0, 1], got {pos_std!r}; fix the encoder_pos_std setting.")
        if pos_std != ENCODER_POS_STD:
            settings["encoder_pos_std"] = float(pos_std)  # only then, as for decoder_head
        bias_std = settings.pop("attn_bias_std", None)
        if bias_std is not None:
            if isinstance(bias_std, bool) or not isinstance(bias_std, (int, float)) or not 0 <= bias_std <= 10:
                raise VistokError(f"attn_bias_std must be a number in [0, 10] (or null for no bias), got {bias_std!r}; fix the attn_bias_std setting.")
            bias_std = settings["attn_bias_std"] = float(bias_std)
        if arch == "titok_original":
            encoder, decoder = titok_original.build(image_size, patch_size, num_tokens, quantizer_module, settings)
        else:
            encoder = TiTokEncoder(image_size, patch_size, num_tokens, settings["width"], settings["depth"],
                                   settings["heads"], settings["mlp_ratio"], out_dim=quantizer_module.in_dim,
                                   pos_std=float(pos_std), attn_bias_std=bias_std)
            decoder = TiTokDecoder(image_size, decoder_patch_size, num_tokens, settings["decoder_width"],
                                   settings["decoder_depth"], settings["decoder_heads"], settings["mlp_ratio"], in_dim=dim,
                                   head=head["decoder_head"], head_channels=head["decoder_head_channels"],
                                   attn_bias_std=bias_std)
    else:
        settings["channel_mult"] = [int(m) for m in settings["channel_mult"]]
        _check_int("channels", settings["channels"], minimum=1)
        _check_int("num_res_blocks", settings["num_res_blocks"], minimum=1)
        if not settings["channel_mult"] or min(settings["channel_mult"]) < 1:
            raise VistokError(f"channel_mult must be a non-empty list of positive integers, got {settings['channel_mult']}.")
        if arch == "conv":
            settings["mid_attention"] = bool(settings["mid_attention"])
            settings["dropout"] = float(settings.get("dropout", 0.0))
        elif token_dropout is not None:
            raise VistokError(f"the {arch} decoder has no mask token and decodes only its full grid of tokens; set token_dropout to null.")
        factor = 2 ** (len(settings["channel_mult"]) - 1)
        if patch_size is not None and patch_size != factor:
            raise VistokError(f"patch_size {patch_size} does not apply to the {arch} tokenizer, whose downsampling factor {factor} comes from channel_mult; leave patch_size unset.")
        patch_size = factor
        if image_size % factor:
            raise VistokError(f"image_size {image_size} is not a multiple of the {arch} downsampling factor {factor} (from channel_mult {settings['channel_mult']}); choose an image_size divisible by {factor}.")
        grid_tokens = (image_size // factor) ** 2
        if num_tokens is not None and num_tokens != grid_tokens:
            raise VistokError(f"num_tokens {num_tokens} does not match the {arch} tokenizer's {grid_tokens} tokens ((image_size / {factor})^2); leave num_tokens unset.")
        num_tokens = grid_tokens
        if arch in NAMED_ARCHS:
            encoder, decoder = NAMED_ARCHS[arch].build(image_size, dim, settings)
        else:
            encoder = ConvEncoder(settings["channels"], settings["channel_mult"], settings["num_res_blocks"],
                                  settings["mid_attention"], out_dim=quantizer_module.in_dim, dropout=settings["dropout"])
            decoder = ConvDecoder(image_size, settings["channels"], settings["channel_mult"], settings["num_res_blocks"],
                                  settings["mid_attention"], in_dim=dim, dropout=settings["dropout"])

    dropout_module = None
    if token_dropout is not None:
        if not isinstance(token_dropout, Mapping):
            raise VistokError(f"token_dropout must be None or a mapping of TailTokenDropout settings, got {token_dropout!r}.")
        unknown = sorted(set(token_dropout) - {"p", "min_tokens", "distribution", "start_step", "stop_step"})
        if unknown:
            raise VistokError(f"unknown token_dropout setting(s) {', '.join(unknown)}; the settings are p, min_tokens, distribution, start_step, stop_step.")
        dropout_module = TailTokenDropout(**token_dropout)
        if dropout_module.min_tokens > num_tokens:
            raise VistokError(f"token_dropout.min_tokens {dropout_module.min_tokens} exceeds the {num_tokens} tokens per image; lower it to at most {num_tokens}.")

    perturb_module = None
    if token_perturb is not None:
        if not isinstance(token_perturb, Mapping):
            raise VistokError(f"token_perturb must be None or a mapping of TokenPerturbation settings, got {token_perturb!r}.")
        unknown = sorted(set(token_perturb) - set(PERTURB_SETTINGS))
        if unknown:
            raise VistokError(f"unknown token_perturb setting(s) {', '.join(unknown)}; the settings are {', '.join(PERTURB_SETTINGS)}.")
        perturb_module = TokenPerturbation(**token_perturb)
        perturb_module.check(quantizer_module)

    config = {
        "arch": arch,
        "preset": preset,
        "image_size": image_size,
        "quantizer": quantizer_module.get_config(),
        "num_tokens": num_tokens,
        "patch_size": patch_size,
        "token_dropout": None if dropout_module is None else dropout_module.get_config(),
        **settings,
    }
    if perturb_module is not None:  # only when set, so configs (and exports) without it read as before
        config["token_perturb"] = perturb_module.get_config()
    return ImageTokenizer(encoder, quantizer_module, decoder, arch=arch, image_size=image_size,
                          max_tokens=num_tokens, patch_size=patch_size, token_dropout=dropout_module, config=config,
                          token_perturb=perturb_module)


def _setting(settings: dict[str, Any], name: str, default: Any, pop: bool = False) -> Any:
    """``settings[name]``, or ``default`` when it is absent or None. Not ``or``: a 0 must reach the
    checks and fail there, not silently become the default."""
    value = settings.pop(name, None) if pop else settings.get(name)
    return default if value is None else value


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VistokError(f"{name} must be an integer >= {minimum}, got {value!r}; fix the {name} setting.")
