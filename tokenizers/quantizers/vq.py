"""Vector quantization (van den Oord et al., 2017, VQ-VAE) with the usual refinements.

Lookup. Each latent z is replaced by its nearest codeword c_k, k = argmin_k ||z - c_k||^2,
computed by the expansion ||z||^2 - 2 z.c_k + ||c_k||^2 as one matrix product per block of
tokens x codes, so a 65536-code book never needs the whole tokens x codes matrix. The decoder
receives ``z + sg(c_k - z)``: the value of the code with the gradient of the identity (straight-through).

Losses. ``||sg(z) - c_k||^2`` moves codes to their latents (codebook loss) and
``commitment_weight * ||z - sg(c_k)||^2`` keeps latents near their codes. With ``ema=True`` the
codebook loss is replaced by exponential moving averages of the per-code counts and latent sums
(VQ-VAE appendix; Razavi et al., 2019), with Laplace smoothing of the counts.

Factorized, normalised codes (Yu et al., 2021, ViT-VQGAN; LlamaGen). With ``codebook_dim`` the
lookup happens in a low-dimensional space (a linear map dim -> codebook_dim in, and back out);
with ``use_cosine`` latents and codes are l2-normalised, so nearest means largest cosine. Both
raise codebook usage.

Dead codes. A code not chosen in ``dead_code_steps`` consecutive training forwards is re-seeded
from a ring buffer of recent (projected, normalised) encoder outputs.

Distributed training. When ``torch.distributed`` is initialised at forward time, every training
forward all-reduces the per-code counts (and, with EMA, the latent sums) and all-gathers the
latents it adds to the restart buffer. Every rank then holds the same statistics and buffer and
applies the same deterministic restart rule, so codebooks stay identical. The collectives run on
every training forward regardless of the data, so no rank can wait on one that another skips.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, counts_stats, uniform_like


# Codes per block of the nearest-code search; tokens per block follow from lookup_chunk_elements.
LOOKUP_CODE_BLOCK = 2048
# A VQ code's neighbourhood for token perturbation when no k is given: its 8 nearest codes.
DEFAULT_NEIGHBOURS = 8


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(Quantizer):
    """Nearest-codeword quantizer with a learned codebook of ``codebook_size`` vectors.

    Args:
        dim: latent width D of the ``(B, N, D)`` input.
        codebook_size: number of codes K.
        codebook_dim: width of the codes; when set and different from ``dim``, latents are
            projected to it for the lookup and the chosen codes projected back (factorized codes).
        use_cosine: l2-normalise latents and codes (cosine-similarity lookup).
        ema: update codes by exponential moving averages instead of the codebook loss.
        decay: EMA decay per training forward.
        commitment_weight: beta of the commitment loss.
        codebook_weight: weight of the codebook loss (ignored with ``ema``).
        dead_code_steps: re-seed codes unused for this many training forwards (0 = never).
        restart_buffer_size: recent latents kept for re-seeding.
        restart_samples_per_step: latents each rank adds to that buffer per training forward.
        eps: Laplace smoothing of the EMA counts.
        lookup_chunk_elements: scores computed at once in the nearest-code search
            (None: 2^20 on CPU, 2^28 on GPU).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        use_cosine: bool = False,
        ema: bool = False,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_steps: int = 0,
        restart_buffer_size: int = 4096,
        restart_samples_per_step: int = 256,
        eps: float = 1e-5,
        lookup_chunk_elements: int | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise VistokError(f"VectorQuantizer needs dim >= 1 and codebook_size >= 1, got dim={dim}, codebook_size={codebook_size}.")
        if codebook_dim is not None and codebook_dim < 1:
            raise VistokError(f"VectorQuantizer codebook_dim must be a positive integer or None, got {codebook_dim}.")
        if not 0.0 <= decay < 1.0:
            raise VistokError(f"VectorQuantizer decay must be in [0, 1), got {decay}; 0.99 is usual.")
        if dead_code_steps < 0 or restart_buffer_size < 1 or restart_samples_per_step < 1 or (
            lookup_chunk_elements is not None and lookup_chunk_elements < 1
        ):
            raise VistokError(
                "VectorQuantizer dead_code_steps must be >= 0 and restart_buffer_size, "
                "restart_samples_per_step and lookup_chunk_elements must be positive."
            )
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim) if codebook_dim is not None else self.dim
        self.factorized = self.codebook_dim != self.dim
        self.use_cosine = bool(use_cosine)
        self.ema = bool(ema)
        self.decay = float(decay)
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        self.dead_code_steps = int(dead_code_steps)
        self.restart_buffer_size = int(restart_buffer_size)
        self.restart_samples_per_step = int(restart_samples_per_step)
        self.eps = float(eps)
        self.lookup_chunk_elements = None if lookup_chunk_elements is None else int(lookup_chunk_elements)
        # Kept so get_config reproduces what the user asked for (None vs an explicit equal width).
        self._codebook_dim_arg = None if codebook_dim is None else int(codebook_dim)

        self.project_in = nn.Linear(self.dim, self.codebook_dim) if self.factorized else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if self.factorized else nn.Identity()

        initial = torch.randn(self.codebook_size, self.codebook_dim)
        if self.use_cosine:
            initial = F.normalize(initial, dim=-1)
        if self.ema:
            # Updated by moving averages, not by the optimiser.
            self.register_buffer("codebook", initial)
            self.register_buffer("cluster_size", torch.ones(self.codebook_size))
            self.register_buffer("embed_sum", initial.clone())
        else:
            self.codebook = nn.Parameter(initial)
        if self.dead_code_steps > 0:
            self.register_buffer("steps_unused", torch.zeros(self.codebook_size, dtype=torch.long))
            # The restart buffer is refilled within a few steps, so checkpoints need not carry it.
            self.register_buffer("restart_buffer", torch.zeros(self.restart_buffer_size, self.codebook_dim), persistent=False)
            self.register_buffer("buffer_next", torch.zeros((), dtype=torch.long), persistent=False)
            self.register_buffer("buffer_filled", torch.zeros((), dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ lookup
    def codes(self) -> torch.Tensor:
        """(K, codebook_dim) codewords as used by the lookup (normalised with ``use_cosine``)."""
        return F.normalize(self.codebook, dim=-1) if self.use_cosine else self.codebook

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z: (T, d), (K, d) -> (T,) long.

        ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2, and ||z||^2 is the same for every code of a row,
        so the nearest code maximises the score z.c - ||c||^2 / 2 (for unit vectors simply z.c,
        the cosine). Scores are computed as one matrix product per block of tokens x codes; a
        running maximum carries the best code across code blocks (ties keep the lower index, as
        argmax does). Blocks of about a million scores stay in cache on CPU, which is about twice
        as fast as one large product followed by a reduction; on GPU the blocks are large.
        """
        tokens, size = z.shape[0], codes.shape[0]
        budget = self.lookup_chunk_elements or (2**20 if z.device.type == "cpu" else 2**28)
        code_block = min(size, LOOKUP_CODE_BLOCK)
        token_block = max(1, budget // code_block)
        half_norms = None if self.use_cosine else codes.pow(2).sum(dim=1).mul_(-0.5)
        best = []
        for token_start in range(0, tokens, token_block):
            rows = z[token_start : token_start + token_block]
            best_score = best_index = None
            for start in range(0, size, code_block):
                block = codes[start : start + code_block]
                if half_norms is None:
                    score = rows @ block.t()
                else:
                    score = torch.addmm(half_norms[start : start + code_block], rows, block.t())
                value, index = score.max(dim=1)
                if best_score is None:
                    best_score, best_index = value, index
                else:
                    better = value > best_score
                    best_score = torch.where(better, value, best_score)
                    best_index = torch.where(better, index + start, best_index)
            best.append(best_index)
        return torch.cat(best)

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """latents (B, N, D) float32 -> nearest codes (B, N, D), indices (B, N) in [0, K)."""
        batch, tokens, _ = latents.shape
        z = self.project_in(latents).reshape(-1, self.codebook_dim)
        if self.use_cosine:
            z = F.normalize(z, dim=-1)
        codes = self.codes()
        indices = self.nearest(z.detach(), codes.detach())
        chosen = F.embedding(indices, codes)

        commitment = F.mse_loss(z, chosen.detach())
        loss = self.commitment_weight * commitment
        if not self.ema:
            loss = loss + self.codebook_weight * F.mse_loss(chosen, z.detach())
        quantized = z + (chosen - z).detach()

        counts = torch.zeros(self.codebook_size, device=z.device).index_add_(0, indices, torch.ones_like(indices, dtype=torch.float))
        stats = counts_stats(counts)
        stats["commitment"] = commitment.detach()
        if self.training:
            self._update(z.detach(), indices, counts)
        return QuantizerOutput(
            quantized=self.project_out(quantized.reshape(batch, tokens, self.codebook_dim)),
            indices=indices.reshape(batch, tokens),
            loss=loss,
            stats=stats,
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, N) long in [0, K) -> (B, N, D) float, the codes (projected back when factorized)."""
        return self.project_out(F.embedding(indices, self.codes()))

    @torch.no_grad()
    def nearest_codes(self, indices: torch.Tensor, k: int) -> torch.Tensor:
        """(U,) long distinct codes -> (U, k) long: each code's k nearest other codes, nearest first,
        by squared distance in the lookup space (normalised codes with ``use_cosine``). Computed for the
        given codes only, in blocks of rows, so a large codebook never needs its K x K distances."""
        codes = self.codes().detach().float()
        norms = codes.pow(2).sum(dim=1)
        rows = max(1, (self.lookup_chunk_elements or 2**22) // self.codebook_size)
        nearest = []
        for start in range(0, indices.numel(), rows):
            chosen = indices[start:start + rows]
            distances = torch.addmm(norms[None, :], codes[chosen], codes.t(), alpha=-2.0) + norms[chosen, None]
            distances[torch.arange(chosen.numel(), device=chosen.device), chosen] = float("inf")  # not itself
            nearest.append(distances.topk(k, dim=1, largest=False).indices)
        return torch.cat(nearest)

    def neighbourhood_size(self, k: int | None) -> int:
        k = DEFAULT_NEIGHBOURS if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < self.codebook_size:
            raise VistokError(f"the neighbourhood size k must be a whole number from 1 to {self.codebook_size - 1} "
                              f"(the other codes of this {self.codebook_size}-code book), got {k!r}.")
        return k

    @torch.no_grad()
    def neighbours(self, indices: torch.Tensor, k: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """One of each code's ``k`` nearest other codes (default 8), uniformly. Same shape as ``indices``."""
        k = self.neighbourhood_size(k)
        distinct, inverse = torch.unique(indices.reshape(-1), return_inverse=True)
        pick = (uniform_like((inverse.numel(),), generator, indices.device) * k).long().clamp_max(k - 1)
        return self.nearest_codes(distinct, k)[inverse, pick].reshape(indices.shape)

    # ------------------------------------------------------------------ training-time updates
    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA statistics and dead-code restarts after a training lookup; z (T, d) detached.

        Parameters are changed through ``.data`` so the autograd graph of this forward (which
        may still be waiting for backward) is not invalidated; the rows that change are unused
        in this forward, so their gradients are zero anyway.
        """
        distributed = _distributed()
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z)
            stacked = torch.cat([counts.unsqueeze(1), sums], dim=1)
            if distributed:
                dist.all_reduce(stacked)
            counts, sums = stacked[:, 0], stacked[:, 1:]
            self.cluster_size.lerp_(counts, 1 - self.decay)
            self.embed_sum.lerp_(sums, 1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        elif self.dead_code_steps > 0 and distributed:
            counts = counts.clone()
            dist.all_reduce(counts)
        if self.dead_code_steps > 0:
            self._remember(z, distributed)
            self._restart_dead_codes(counts)

    def _remember(self, z: torch.Tensor, distributed: bool) -> None:
        """Add a fixed number of random rows of z (from every rank) to the restart ring buffer."""
        picked = z[torch.randint(z.shape[0], (self.restart_samples_per_step,), device=z.device)]
        if distributed:
            gathered = [torch.empty_like(picked) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, picked)
            picked = torch.cat(gathered)
        picked = picked[-self.restart_buffer_size :]
        slots = (self.buffer_next + torch.arange(picked.shape[0], device=z.device)) % self.restart_buffer_size
        self.restart_buffer.index_copy_(0, slots, picked)
        self.buffer_next.copy_((self.buffer_next + picked.shape[0]) % self.restart_buffer_size)
        self.buffer_filled.copy_((self.buffer_filled + picked.shape[0]).clamp(max=self.restart_buffer_size))

    def _restart_dead_codes(self, counts: torch.Tensor) -> None:
        """Re-seed codes unused for ``dead_code_steps`` forwards; counts (K,) are global counts.

        The j-th dead code takes the j-th most recent buffered latent, so distinct dead codes
        get distinct latents and every rank (same buffer, same counts) makes the same choice.
        Written with ``torch.where`` over the whole codebook: no host sync, no data-dependent branch.
        """
        self.steps_unused.copy_(torch.where(counts > 0, 0, self.steps_unused + 1))
        dead = self.steps_unused >= self.dead_code_steps
        order = torch.cumsum(dead.long(), dim=0) - 1
        source = torch.remainder(self.buffer_next - 1 - order, self.buffer_filled.clamp(min=1))
        fresh = self.restart_buffer[source]
        if self.use_cosine:
            fresh = F.normalize(fresh, dim=-1)
        mask = dead.unsqueeze(1)
        self.codebook.data.copy_(torch.where(mask, fresh, self.codebook.data))
        if self.ema:
            # A restarted code counts as one fresh observation of its new value.
            self.cluster_size.copy_(torch.where(dead, 1.0, self.cluster_size))
            self.embed_sum.copy_(torch.where(mask, fresh, self.embed_sum))
        self.steps_unused.copy_(torch.where(dead, 0, self.steps_unused))

    def get_config(self) -> dict:
        return {
            "_target_": "vistok.tokenizers.quantizers.VectorQuantizer",
            "dim": self.dim,
            "codebook_size": self.codebook_size,
            "codebook_dim": self._codebook_dim_arg,
            "use_cosine": self.use_cosine,
            "ema": self.ema,
            "decay": self.decay,
            "commitment_weight": self.commitment_weight,
            "codebook_weight": self.codebook_weight,
            "dead_code_steps": self.dead_code_steps,
            "restart_buffer_size": self.restart_buffer_size,
            "restart_samples_per_step": self.restart_samples_per_step,
            "eps": self.eps,
            "lookup_chunk_elements": self.lookup_chunk_elements,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"use_cosine={self.use_cosine}, ema={self.ema}, dead_code_steps={self.dead_code_steps}"
        )
