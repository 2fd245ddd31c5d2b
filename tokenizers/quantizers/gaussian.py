"""Continuous tokens from a diagonal Gaussian posterior (Kingma & Welling, 2014; as in LDM's KL-VAE
and TiTok's VAE variant).

The encoder emits ``2 * dim`` channels per token: a mean and a log-variance (clamped to
[-30, 20] as in LDM). In training the token is a reparameterised sample ``mean + std * eps``
and the loss is ``kl_weight * KL(N(mean, std^2) || N(0, 1))`` (summed over channels, averaged
over tokens); in eval mode the token is the mean, so encoding is deterministic.
"""
from __future__ import annotations

import torch

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput


class DiagonalGaussian(Quantizer):
    """(B, N, 2*dim) mean and log-variance -> (B, N, dim) tokens; ``codebook_size`` is None.

    Args:
        dim: D, the token width (the encoder's output is twice as wide: ``in_dim``).
        kl_weight: weight of the KL term in the loss.
    """

    def __init__(self, dim: int, kl_weight: float = 1e-6) -> None:
        super().__init__()
        if dim < 1 or kl_weight < 0:
            raise VistokError(f"DiagonalGaussian needs dim >= 1 and kl_weight >= 0, got dim={dim}, kl_weight={kl_weight}.")
        self.dim = int(dim)
        self.codebook_size = None
        self.kl_weight = float(kl_weight)

    @property
    def in_dim(self) -> int:
        return 2 * self.dim

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """latents (B, N, 2D) float32 -> tokens (B, N, D): a sample in training, the mean in eval."""
        mean, logvar = latents.chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)
        std = torch.exp(0.5 * logvar)
        tokens = mean + std * torch.randn_like(mean) if self.training else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        stats = {"kl": kl.detach(), "std": std.mean().detach()}
        return QuantizerOutput(quantized=tokens, indices=None, loss=self.kl_weight * kl, stats=stats)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        raise VistokError("a Gaussian (VAE) tokenizer has continuous tokens, not indices; pass the (B, k, D) codes encode() returned.")

    def get_config(self) -> dict:
        return {"_target_": "vistok.tokenizers.quantizers.DiagonalGaussian", "dim": self.dim, "kl_weight": self.kl_weight}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kl_weight={self.kl_weight}"
