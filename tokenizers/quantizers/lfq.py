"""Lookup-free quantization (Yu et al., 2023, MAGVIT-v2, "Language Model Beats Diffusion").

Each of the D latent channels is quantized to its sign, ``q_d = scale * sign(z_d)``, with a
straight-through gradient; the codebook is the implicit set of 2^D corners of a hypercube and a
code's index is its bit pattern, ``sum_d [z_d > 0] * 2^d``. Nothing is looked up.

Auxiliary loss. With the soft assignment ``p(c | z) = softmax_c(2 z.c / temperature)`` over all
codes c in {-scale, +scale}^D,

    loss = entropy_weight * (E_z[H(p(. | z))] - diversity_gamma * H(E_z[p(. | z)]))
           + commitment_weight * ||z - q||^2,

i.e. each token should commit to one code while the batch as a whole spreads over the codebook.

Exact and cheap at 2^18 codes. The soft assignment factorises over bits:
``p(c | z) = prod_d p(b_d | z_d)`` with ``p(b_d = 1 | z_d) = sigmoid(x_d)``, ``x_d = 4 scale z_d / T``.
So the per-token entropy is a sum of D binary entropies. The batch-average assignment does not
factorise, but splitting the bits into a low half (D_lo bits) and a high half (D_hi bits) gives

    E_z[p(c_hi, c_lo | z)] = (1/T) sum_t P_hi[t, c_hi] * P_lo[t, c_lo] = (P_hi^T @ P_lo)[c_hi, c_lo] / T,

where P_lo (T, 2^D_lo) and P_hi (T, 2^D_hi) are the per-half assignments, each a product of per-bit
probabilities. The (T x 2^D) matrix a direct softmax needs is never formed: the work is one matrix
product of T * 2^D multiply-adds, and memory is O(T * 2^(D/2) + 2^D). The product and the entropy
are computed in chunks of high-half codes, each under gradient checkpointing, so the 2^D average
probabilities are never all held for backward when the codebook is large.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, code_stats, no_neighbourhood_size, uniform_like

# The batch entropy costs T * 2^D multiply-adds; beyond this it is impractically slow, not wrong.
MAX_ENTROPY_BITS = 28
# Indices are int64 bit patterns.
MAX_BITS = 62


def bit_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Joint assignment over the codes of a group of bits.

    logits: (T, d) per-bit log-odds x_d = log p(b_d = 1) - log p(b_d = 0).
    Returns (T, 2^d) with entry [t, c] = prod_d p(b_d = bit d of c | x_t), rows summing to 1.
    Built one bit at a time (an outer product per bit), so it is exact and needs no exp/log.
    """
    on = torch.sigmoid(logits)
    off = torch.sigmoid(-logits)
    probs = logits.new_ones(logits.shape[0], 1)
    for d in range(logits.shape[1]):
        # Codes with bit d clear come first, then those with it set: index = sum_d b_d 2^d.
        probs = torch.cat([probs * off[:, d : d + 1], probs * on[:, d : d + 1]], dim=1)
    return probs


def _entropy_of_average(probs_hi: torch.Tensor, probs_lo: torch.Tensor) -> torch.Tensor:
    """-sum p log p of the batch-average assignment over one chunk of (c_hi, c_lo) codes."""
    average = probs_hi.t() @ probs_lo / probs_lo.shape[0]
    return -(average * average.clamp_min(1e-30).log()).sum()


def codebook_entropy(logits: torch.Tensor, chunk_size: int = 2**20) -> torch.Tensor:
    """Entropy of the batch-average soft assignment over all 2^D codes, computed exactly.

    logits: (T, D) per-bit log-odds (``4 * scale * z / temperature``).
    chunk_size: codes whose average probability is materialised at once; each chunk is
        recomputed in backward (checkpointing) when there is more than one.
    Returns a scalar in [0, D log 2].
    """
    bits = logits.shape[1]
    lo_bits = bits // 2
    probs_lo = bit_probabilities(logits[:, :lo_bits])
    probs_hi = bit_probabilities(logits[:, lo_bits:])
    rows = max(1, chunk_size // probs_lo.shape[1])
    n_hi = probs_hi.shape[1]
    recompute = torch.is_grad_enabled() and logits.requires_grad and n_hi > rows
    total = logits.new_zeros(())
    for start in range(0, n_hi, rows):
        chunk = probs_hi[:, start : start + rows]
        if recompute:
            total = total + checkpoint(_entropy_of_average, chunk, probs_lo, use_reentrant=False)
        else:
            total = total + _entropy_of_average(chunk, probs_lo)
    return total


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise, stable for large |logits|."""
    return -(torch.sigmoid(logits) * F.logsigmoid(logits) + torch.sigmoid(-logits) * F.logsigmoid(-logits))


class LFQ(Quantizer):
    """Lookup-free (sign) quantizer with a 2^dim implicit codebook.

    Args:
        dim: number of bits D of the ``(B, N, D)`` latents; codebook_size = 2**dim.
        entropy_weight: weight of the entropy terms (0 skips both, and their cost).
        commitment_weight: weight of ``mse(z, q)`` pulling latents to their code.
        diversity_gamma: weight of the batch (codebook) entropy inside the entropy term; 0 skips
            its T * 2^D computation and keeps only the per-token entropy.
        temperature: softmax temperature of the soft assignment (MAGVIT-v2 and
            vector-quantize-pytorch use 1/100).
        scale: code values are +-scale.
        entropy_chunk_size: codes per chunk of the batch-entropy computation (memory bound).
    """

    def __init__(
        self,
        dim: int,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        temperature: float = 0.01,
        scale: float = 1.0,
        entropy_chunk_size: int = 2**20,
    ) -> None:
        super().__init__()
        if not 1 <= int(dim) <= MAX_BITS:
            raise VistokError(f"LFQ dim (bits) must be between 1 and {MAX_BITS}, got {dim}; codebook_size is 2**dim.")
        if entropy_weight > 0 and diversity_gamma > 0 and dim > MAX_ENTROPY_BITS:
            raise VistokError(
                f"LFQ with dim={dim} would need the batch entropy over 2**{dim} codes; "
                f"use dim <= {MAX_ENTROPY_BITS} or set diversity_gamma=0."
            )
        if temperature <= 0 or scale <= 0 or entropy_chunk_size < 1:
            raise VistokError("LFQ temperature, scale and entropy_chunk_size must be positive.")
        self.dim = int(dim)
        self.codebook_size = 2**self.dim
        self.entropy_weight = float(entropy_weight)
        self.commitment_weight = float(commitment_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.temperature = float(temperature)
        self.scale = float(scale)
        self.entropy_chunk_size = int(entropy_chunk_size)
        self.register_buffer("_bit_values", 2 ** torch.arange(self.dim), persistent=False)

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """latents (B, N, D) float32 -> codes in {-scale, +scale}^D, indices (B, N) in [0, 2^D)."""
        positive = latents > 0
        codes = torch.where(positive, self.scale, -self.scale).to(latents.dtype)
        quantized = latents + (codes - latents).detach()
        indices = (positive.long() * self._bit_values).sum(dim=-1)

        commitment = F.mse_loss(latents, codes)
        loss = self.commitment_weight * commitment
        stats = code_stats(indices, self.codebook_size)
        stats["commitment"] = commitment.detach()
        if self.entropy_weight > 0:
            # Per-bit log-odds of the soft assignment softmax_c(2 z.c / T) with c_d = +-scale.
            logits = latents.reshape(-1, self.dim) * (4 * self.scale / self.temperature)
            per_sample = binary_entropy(logits).sum(dim=-1).mean()
            entropy_term = per_sample
            stats["per_sample_entropy"] = per_sample.detach()
            if self.diversity_gamma > 0:
                batch_entropy = codebook_entropy(logits, self.entropy_chunk_size)
                entropy_term = entropy_term - self.diversity_gamma * batch_entropy
                stats["codebook_entropy"] = batch_entropy.detach()
            loss = loss + self.entropy_weight * entropy_term
        return QuantizerOutput(quantized=quantized, indices=indices, loss=loss, stats=stats)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, N) long in [0, 2^D) -> (B, N, D) float in {-scale, +scale}."""
        bits = (indices.unsqueeze(-1) & self._bit_values) != 0
        return torch.where(bits, self.scale, -self.scale).float()

    def neighbourhood_size(self, k: int | None) -> None:
        no_neighbourhood_size("LFQ", k, "the codes one flipped bit away")

    @torch.no_grad()
    def neighbours(self, indices: torch.Tensor, k: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Each code with one bit flipped (the nearest corners of the hypercube), the bit uniform
        among the D. Same shape as ``indices``."""
        self.neighbourhood_size(k)
        bit = (uniform_like(tuple(indices.shape), generator, indices.device) * self.dim).long().clamp_max(self.dim - 1)
        return indices ^ self._bit_values[bit]

    def get_config(self) -> dict:
        return {
            "_target_": "vistok.tokenizers.quantizers.LFQ",
            "dim": self.dim,
            "entropy_weight": self.entropy_weight,
            "commitment_weight": self.commitment_weight,
            "diversity_gamma": self.diversity_gamma,
            "temperature": self.temperature,
            "scale": self.scale,
            "entropy_chunk_size": self.entropy_chunk_size,
        }

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size=2**{self.dim}, entropy_weight={self.entropy_weight}"
