"""What every quantizer shares: the output type, float32 compute and batch statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vistok.tokenizers.errors import VistokError


@dataclass
class QuantizerOutput:
    """Result of quantizing latents.

    quantized: (B, N, D) float, what the decoder sees (gradients reach the encoder).
    indices: (B, N) long code indices, or None for continuous (soft) tokens.
    loss: scalar auxiliary loss (zero where the method has none).
    stats: floats for logging (``usage``: fraction of the codebook used in the batch,
        ``perplexity``); tensors are detached 0-d, so logging does not force a host sync.
    """

    quantized: torch.Tensor
    indices: torch.Tensor | None
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


# Codebooks up to this size are counted with a histogram (one pass over tokens and codes);
# larger ones (LFQ beyond 20 bits) from the sorted indices, whose cost does not grow with them.
HISTOGRAM_MAX_CODES = 2**20


def code_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Batch codebook usage fraction and perplexity of ``indices`` (any shape, long).

    With ``n_t`` the batch count of token t's code and T tokens, the batch entropy is
    ``-(1/T) * sum_t log(n_t / T)``, so only per-token counts are needed. Nothing waits on the
    host: ``torch.bincount`` (which reads the maximum back on CUDA) is used on CPU only.
    """
    # NaN latents turn into out-of-range indices (FSQ rounds NaN to a huge negative number); the
    # statistics must not crash before the training loop's finiteness check names the step and losses.
    flat = indices.reshape(-1).clamp(0, codebook_size - 1)
    total = flat.numel()
    if total == 0:
        zero = torch.zeros((), device=indices.device)
        return {"usage": zero, "perplexity": zero + 1}
    if codebook_size <= HISTOGRAM_MAX_CODES:
        if flat.device.type == "cpu":
            counts = torch.bincount(flat, minlength=codebook_size)
        else:
            counts = torch.zeros(codebook_size, device=flat.device).index_add_(0, flat, torch.ones(total, device=flat.device))
        distinct = torch.count_nonzero(counts)
        count_of_token = counts[flat]
    else:
        ordered = flat.sort().values
        distinct = 1 + (ordered[1:] != ordered[:-1]).sum()
        count_of_token = torch.searchsorted(ordered, ordered, right=True) - torch.searchsorted(ordered, ordered)
    entropy = math.log(total) - count_of_token.float().log().mean()
    return {
        "usage": (distinct.float() / codebook_size).detach(),
        "perplexity": entropy.exp().detach(),
    }


def counts_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Usage fraction and perplexity from a ``(codebook_size,)`` float histogram of code counts."""
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {
        "usage": (counts > 0).float().mean().detach(),
        "perplexity": entropy.exp().detach(),
    }


class Quantizer(nn.Module):
    """Base class: subclasses implement :meth:`quantize` on float32 ``(B, N, D)`` latents.

    ``forward`` runs it with autocast disabled and the input cast to float32, because
    low-precision distances and entropies are a known source of NaNs and collapsed codebooks.
    The output is cast back to the input's dtype so the decoder keeps its precision.
    """

    dim: int
    codebook_size: int | None

    @property
    def in_dim(self) -> int:
        """Width of the latents it takes (the encoder's output); ``dim`` except where a quantizer
        reads more per token than it emits (DiagonalGaussian: mean and log-variance)."""
        return self.dim

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        if latents.ndim != 3 or latents.shape[-1] != self.in_dim:
            raise ValueError(f"{type(self).__name__} expects latents of shape (B, N, {self.in_dim}), got {tuple(latents.shape)}")
        with torch.autocast(device_type=latents.device.type, enabled=False):
            out = self.quantize(latents.float())
        out.quantized = out.quantized.to(latents.dtype)
        return out

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, N) long -> (B, N, D) float, the same vectors ``quantized`` holds for them."""
        raise NotImplementedError

    def neighbours(self, indices: torch.Tensor, k: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """One code near each code, drawn at random: a generator's near-miss (token perturbation).

        indices: long, any shape, in [0, codebook_size). k: how many nearest codes to draw from, for
        quantizers whose neighbourhood has a size (VQ); the others refuse it. generator: seeds the draw
        (its device holds the random numbers, so a CPU generator gives the same codes on any device).
        Returns long, the shape of ``indices``, never equal to the code it replaces.
        """
        self.neighbourhood_size(k)
        raise NotImplementedError  # pragma: no cover - discrete quantizers override it

    def neighbourhood_size(self, k: int | None) -> int | None:
        """Check ``k`` for :meth:`neighbours` without drawing anything; returns the k in use (None where
        the neighbourhood is fixed). Raises VistokError for soft tokens or a k that does not apply."""
        raise VistokError(f"{type(self).__name__} tokens are continuous (no codebook of discrete codes), so they have no "
                          "neighbouring codes to perturb with; perturb a VQ, FSQ or LFQ tokenizer.")

    def get_config(self) -> dict:  # pragma: no cover - abstract
        """JSON-able constructor arguments plus ``"_target_"``; ``build_quantizer`` rebuilds from it."""
        raise NotImplementedError


def uniform_like(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) floats of ``shape`` on ``device``, drawn on the generator's device (the default
    generator of ``device`` when None), so a seeded CPU generator draws the same numbers for any device."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def no_neighbourhood_size(name: str, k: int | None, what: str) -> None:
    """Refuse a k where the neighbours are fixed by the code's structure (FSQ grid, LFQ bits)."""
    if k is not None:
        raise VistokError(f"{name}'s nearest codes are fixed ({what}), so a neighbourhood size k={k} does not apply; leave k unset.")
