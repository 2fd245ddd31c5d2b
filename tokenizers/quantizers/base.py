"""What every quantizer shares: the output type, float32 compute and batch statistics."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


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


def code_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Batch codebook usage fraction and perplexity of ``indices`` (any shape, long)."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
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

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        if latents.ndim != 3 or latents.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects latents of shape (B, N, {self.dim}), got {tuple(latents.shape)}")
        with torch.autocast(device_type=latents.device.type, enabled=False):
            out = self.quantize(latents.float())
        out.quantized = out.quantized.to(latents.dtype)
        return out

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, N) long -> (B, N, D) float, the same vectors ``quantized`` holds for them."""
        raise NotImplementedError
