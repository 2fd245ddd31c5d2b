"""Soft vector quantization (Chen et al., 2024, SoftVQ-VAE).

Each latent z attends over a learned codebook: ``w = softmax(sim(z, C) / temperature)`` and the
token is ``w @ C``, a convex combination of codewords. Nothing is rounded, so the whole path is
differentiable (no straight-through estimator) and tokens are continuous: ``indices`` is None.
``sim`` is the cosine similarity (latents and codes l2-normalised) or the negative squared
distance. An optional entropy regulariser, as in LFQ, sharpens each token's weights
(low per-token entropy) while spreading the batch over the codebook (high entropy of the
average weights). For monitoring, usage and perplexity count each token's largest weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, code_stats

SIMILARITIES = ("cosine", "distance")


class SoftVQ(Quantizer):
    """Soft tokens: temperature-softmax weights over a codebook, token = weights @ codebook.

    Args:
        dim: latent width D of the ``(B, N, D)`` input.
        codebook_size: number of codewords K (``.codebook_size`` is None: tokens are continuous).
        temperature: softmax temperature tau (about 0.07 for cosine similarity).
        similarity: ``"cosine"`` or ``"distance"`` (negative squared Euclidean distance).
        codebook_dim: width of the codewords; projections in and out when it differs from dim.
        entropy_weight: weight of the entropy regulariser (0 = off).
        diversity_gamma: weight of the batch-average entropy inside the regulariser.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        temperature: float = 0.07,
        similarity: str = "cosine",
        codebook_dim: int | None = None,
        entropy_weight: float = 0.0,
        diversity_gamma: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise VistokError(f"SoftVQ needs dim >= 1 and codebook_size >= 1, got dim={dim}, codebook_size={codebook_size}.")
        if similarity not in SIMILARITIES:
            raise VistokError(f"SoftVQ similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        if temperature <= 0:
            raise VistokError(f"SoftVQ temperature must be positive, got {temperature}; 0.07 is usual.")
        self.dim = int(dim)
        self.num_codes = int(codebook_size)
        self.codebook_size = None  # continuous tokens: no discrete vocabulary
        self.temperature = float(temperature)
        self.similarity = similarity
        self.codebook_dim = int(codebook_dim) if codebook_dim is not None else self.dim
        self._codebook_dim_arg = None if codebook_dim is None else int(codebook_dim)
        self.entropy_weight = float(entropy_weight)
        self.diversity_gamma = float(diversity_gamma)

        factorized = self.codebook_dim != self.dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if factorized else nn.Identity()
        initial = torch.randn(self.num_codes, self.codebook_dim)
        self.codebook = nn.Parameter(F.normalize(initial, dim=-1) if similarity == "cosine" else initial)

    def codes(self) -> torch.Tensor:
        """(K, codebook_dim) codewords the tokens are mixed from (unit length for cosine)."""
        return F.normalize(self.codebook, dim=-1) if self.similarity == "cosine" else self.codebook

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """latents (B, N, D) float32 -> soft tokens (B, N, D); indices None."""
        batch, tokens, _ = latents.shape
        z = self.project_in(latents).reshape(-1, self.codebook_dim)
        codes = self.codes()
        # The 1/temperature is folded into the matrix product so only one (T, K) score matrix
        # exists before the softmax.
        if self.similarity == "cosine":
            logits = (F.normalize(z, dim=-1) / self.temperature) @ codes.t()
        else:
            # -||z - c||^2 / tau = (2 z.c - ||c||^2 - ||z||^2) / tau; the ||z||^2 term is the
            # same for every code of a row, and softmax ignores it.
            logits = torch.addmm(codes.pow(2).sum(dim=1) / -self.temperature, z, codes.t(), alpha=2.0 / self.temperature)
        if self.entropy_weight > 0:
            log_weights = F.log_softmax(logits, dim=-1)
            weights = log_weights.exp()
        else:
            weights = F.softmax(logits, dim=-1)
        soft_tokens = weights @ codes

        loss = latents.new_zeros(())
        stats = code_stats(weights.detach().argmax(dim=-1), self.num_codes)
        if self.entropy_weight > 0:
            per_sample = -(weights * log_weights).sum(dim=-1).mean()
            average = weights.mean(dim=0)
            batch_entropy = -(average * average.clamp_min(1e-30).log()).sum()
            loss = self.entropy_weight * (per_sample - self.diversity_gamma * batch_entropy)
            stats["per_sample_entropy"] = per_sample.detach()
            stats["codebook_entropy"] = batch_entropy.detach()
        return QuantizerOutput(
            quantized=self.project_out(soft_tokens.reshape(batch, tokens, self.codebook_dim)),
            indices=None,
            loss=loss,
            stats=stats,
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, N) long in [0, K) -> (B, N, D): the single codewords (hard tokens), projected out.

        Soft tokens are mixtures, so this is the codeword a token leans on most, not the token.
        """
        return self.project_out(F.embedding(indices, self.codes()))

    def get_config(self) -> dict:
        return {
            "_target_": "vistok.tokenizers.quantizers.SoftVQ",
            "dim": self.dim,
            "codebook_size": self.num_codes,
            "temperature": self.temperature,
            "similarity": self.similarity,
            "codebook_dim": self._codebook_dim_arg,
            "entropy_weight": self.entropy_weight,
            "diversity_gamma": self.diversity_gamma,
        }

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_codes={self.num_codes}, temperature={self.temperature}, similarity={self.similarity!r}"
