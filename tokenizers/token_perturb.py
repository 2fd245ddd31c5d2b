"""Token perturbation: replace a fraction of each image's tokens by other codes, as a generator's mistakes.

A generator that samples tokens gets some of them wrong; a decoder trained only on the encoder's
own tokens never saw such mistakes ("Image Tokenizer Needs Post-Training"). Two kinds of mistake:

- ``random``: a uniform code other than the right one (a wild miss);
- ``nearest``: one of the code's neighbours (a near miss): for VQ one of the k nearest codewords,
  for FSQ a grid neighbour (one channel one level away), for LFQ one flipped bit
  (:meth:`vistok.tokenizers.quantizers.Quantizer.neighbours`).

A rate r replaces exactly ``round(r * n)`` of an image's n tokens, at positions drawn uniformly.
:func:`perturbed_variants` perturbs at several rates with shared draws, so the tokens replaced at a
lower rate are also replaced, by the same codes, at every higher one. :class:`TokenPerturbation`
is the training option (a probability per image and a warm-up of the rate). Soft (continuous)
tokens have no codes to swap and are refused in one sentence. Pure torch: no Lightning or files.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, uniform_like

KINDS = ("random", "nearest")


def check_discrete(quantizer: Quantizer) -> int:
    """The codebook size; a VistokError for soft tokens, which have no codes to swap."""
    if quantizer.codebook_size is None:
        raise VistokError(f"{type(quantizer).__name__} tokens are continuous, so there are no codes to replace them with; "
                          "token perturbation needs a discrete tokenizer (VQ, FSQ or LFQ).")
    return int(quantizer.codebook_size)


def check_rate(rate: float, what: str = "the perturbation rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise VistokError(f"{what} must be a fraction of the tokens in [0, 1], got {rate!r}.")
    return float(rate)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise VistokError(f"unknown perturbation kind {kind!r}; use random (a uniform code) or nearest (a neighbouring code).")
    return kind


def replacement_indices(quantizer: Quantizer, indices: torch.Tensor, kind: str = "random", k: int | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A wrong code for every token: long, the shape of ``indices``, never the token's own code.

    kind ``random``: uniform over the other codebook_size - 1 codes; ``nearest``: the quantizer's
    neighbours (``k`` only for VQ). ``generator`` seeds the draw (see :func:`uniform_like`).
    """
    size = check_discrete(quantizer)
    if check_kind(kind) == "nearest":
        return quantizer.neighbours(indices, k, generator)
    if k is not None:
        raise VistokError(f"the neighbourhood size k={k} applies to nearest perturbation only; leave k unset for random.")
    if size < 2:
        raise VistokError("a codebook of one code has no other code to put in a token's place.")
    # an offset of 1..size-1 (mod size) is uniform over the other codes; float64 keeps 2^53 codes exact
    draw = uniform_like(tuple(indices.shape), generator, indices.device).double()
    offset = 1 + (draw * (size - 1)).long().clamp_max(size - 2)
    return (indices + offset) % size


def position_ranks(shape: tuple[int, int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, n) long: a uniformly random order of each row's positions (rank 0 is replaced first)."""
    return uniform_like(shape, generator, device).argsort(dim=1).argsort(dim=1)


def replaced_count(rate: float | torch.Tensor, num_tokens: int) -> torch.Tensor | int:
    """Tokens of n replaced at rate r: round(r * n), halves up (a tensor of rates gives a tensor)."""
    if isinstance(rate, torch.Tensor):
        return torch.floor(rate * num_tokens + 0.5).long()
    return int(rate * num_tokens + 0.5)


def perturbed_variants(quantizer: Quantizer, indices: torch.Tensor, rates: Sequence[float], kind: str = "random",
                       k: int | None = None, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """``indices`` (B, n) long with round(rate * n) tokens per image replaced, one tensor per rate.

    The positions and codes are drawn once, so a lower rate's replacements are a subset of a
    higher one's (quality can only be compared across rates on the same mistakes), and rate 0
    returns the tokens unchanged.
    """
    rates = [check_rate(rate) for rate in rates]
    replacements = replacement_indices(quantizer, indices, kind, k, generator)
    ranks = position_ranks(tuple(indices.shape), generator, indices.device)
    return [torch.where(ranks < replaced_count(rate, indices.shape[1]), replacements, indices) for rate in rates]


class TokenPerturbation(nn.Module):
    """The training option: perturb the tokens the decoder sees, next to tail-token dropout.

    Args:
        rate: fraction of an image's tokens replaced once the warm-up is over.
        p: probability that an image is perturbed at all in a training step.
        kind: ``random`` or ``nearest`` (see the module docstring).
        k: the neighbourhood size of ``nearest`` for VQ (None: 8); FSQ and LFQ refuse it.
        warmup_steps: the rate rises linearly from 0 to ``rate`` over these training steps (0: at once).
    """

    def __init__(self, rate: float = 0.1, p: float = 1.0, kind: str = "random", k: int | None = None,
                 warmup_steps: int = 0) -> None:
        super().__init__()
        self.rate = check_rate(rate, "token_perturb.rate")
        self.p = check_rate(p, "token_perturb.p (a probability)")
        self.kind = check_kind(kind)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise VistokError(f"token_perturb.k must be a whole number >= 1 or null, got {k!r}.")
        if kind == "random" and k is not None:
            raise VistokError(f"token_perturb.k={k} applies to kind nearest only; set it to null for random.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise VistokError(f"token_perturb.warmup_steps must be a whole number >= 0, got {warmup_steps!r}.")
        self.k = k
        self.warmup_steps = warmup_steps

    def get_config(self) -> dict:
        """Plain constructor kwargs: ``TokenPerturbation(**config)`` rebuilds this module."""
        return {"rate": self.rate, "p": self.p, "kind": self.kind, "k": self.k, "warmup_steps": self.warmup_steps}

    def check(self, quantizer: Quantizer) -> None:
        """Refuse, at build time, a quantizer this perturbation cannot apply to."""
        check_discrete(quantizer)
        if self.kind == "nearest":
            quantizer.neighbourhood_size(self.k)

    def rate_at(self, step: int | None) -> float:
        """The rate at a training step: ramped over ``warmup_steps``; None (step unknown) is after the warm-up."""
        if step is None or self.warmup_steps == 0:
            return self.rate
        return self.rate * min(1.0, step / self.warmup_steps)

    def forward(self, quantizer: Quantizer, codes: torch.Tensor, indices: torch.Tensor,
                step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, n, D) as the decoder would see them and their indices (B, n) long -> (the codes with
        the replaced tokens' codes swapped in, (B, n) bool of the replaced positions). Replaced positions
        carry no gradient to the encoder; the others keep theirs."""
        batch, num_tokens = indices.shape
        rate = self.rate_at(step)
        chosen = torch.rand(batch, device=indices.device) < self.p
        count = chosen.long() * replaced_count(rate, num_tokens)
        replaced = position_ranks((batch, num_tokens), None, indices.device) < count[:, None]
        swapped = quantizer.indices_to_codes(replacement_indices(quantizer, indices, self.kind, self.k)).to(codes.dtype)
        return torch.where(replaced[..., None], swapped.detach(), codes), replaced

    def extra_repr(self) -> str:
        return f"rate={self.rate}, p={self.p}, kind={self.kind!r}, k={self.k}, warmup_steps={self.warmup_steps}"
