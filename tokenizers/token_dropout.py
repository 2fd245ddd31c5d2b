"""Tail-token dropout: train decoders to reconstruct from any prefix of the token sequence.

During training a kept length ``k`` is drawn per sample and the decoder only sees tokens
``0..k-1``; positions ``k..K-1`` are overwritten with one learned mask token (FlexTok,
One-D-Piece). Information then concentrates at the head of the sequence, so at inference any
prefix decodes. :func:`pad_with_mask_token` is the one place where that overwriting happens,
shared by the 1D and 2D decoders so that both hide dropped tokens the same way.
"""
from __future__ import annotations

import torch
from torch import nn

from vistok.tokenizers.errors import VistokError

DISTRIBUTIONS = ("uniform", "pow2", "uniform_pow2")


def keep_mask(batch_size: int, num_given: int, max_tokens: int, lengths: torch.Tensor | None,
              device: torch.device) -> torch.Tensor:
    """(B, K) bool: True where position ``i < num_given`` and ``i < lengths[b]``."""
    positions = torch.arange(max_tokens, device=device)
    keep = (positions < num_given).expand(batch_size, max_tokens)
    if lengths is not None:
        keep = keep & (positions[None, :] < lengths.to(device)[:, None])
    return keep


def pad_with_mask_token(tokens: torch.Tensor, mask_token: torch.Tensor, max_tokens: int,
                        lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Pad a token prefix to ``max_tokens`` slots, replacing hidden positions by ``mask_token``.

    tokens: (B, k, C) with 1 <= k <= K; mask_token: (C,); lengths: optional (B,) long, the
    number of leading tokens each sample keeps. Returns (B, K, C) where positions ``>= k`` and
    ``>= lengths[b]`` hold ``mask_token``. ``torch.where`` (not a multiplication) selects, so
    neither values (even NaN/inf) nor gradients of hidden tokens pass through.
    """
    batch_size, num_given, channels = tokens.shape
    if not 1 <= num_given <= max_tokens:
        raise VistokError(f"got {num_given} tokens but the decoder takes 1 to {max_tokens}; pass a prefix of at most {max_tokens} tokens.")
    if mask_token.shape != (channels,):
        raise ValueError(f"mask_token must have shape ({channels},), got {tuple(mask_token.shape)}")
    if num_given < max_tokens:
        tokens = torch.cat([tokens, tokens.new_zeros(batch_size, max_tokens - num_given, channels)], dim=1)
    keep = keep_mask(batch_size, num_given, max_tokens, lengths, tokens.device)
    return torch.where(keep[..., None], tokens, mask_token.to(tokens.dtype).view(1, 1, channels))


class TailTokenDropout(nn.Module):
    """Sample per-sample kept lengths for tail-token (nested) dropout.

    Args:
        p: probability that a sample is truncated at all; otherwise it keeps all K tokens.
        min_tokens: smallest kept length (>= 1).
        distribution: how the kept length k is drawn from [min_tokens, K]:
            ``"uniform"``: uniformly;
            ``"pow2"``: uniformly over the powers of two in that range, plus K itself (so the
            full sequence is trained even when K is not a power of two);
            ``"uniform_pow2"``: uniformly, then rounded up to a power of two, capped at K.
            Only ``"uniform"`` trains every length; the power-of-two modes leave the lengths in
            between untrained, so choose them only if users will ask for those lengths alone.
        start_step, stop_step: the training steps between which samples are truncated
            (``start_step <= step < stop_step``); outside them every sample keeps all K tokens.
            0 and None: the whole run. Nesting slows down how fast the full-length code forms, so
            at small budgets it pays to let the full-length code form first and to end on it
            (docs/rd32.md).
    """

    def __init__(self, p: float = 1.0, min_tokens: int = 1, distribution: str = "uniform", start_step: int = 0,
                 stop_step: int | None = None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise VistokError(f"token dropout p must be a probability in [0, 1], got {p!r}; set token_dropout.p accordingly.")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise VistokError(f"token dropout min_tokens must be an integer >= 1, got {min_tokens!r}; set token_dropout.min_tokens to 1 or more.")
        if distribution not in DISTRIBUTIONS:
            raise VistokError(f"unknown token dropout distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise VistokError(f"token dropout start_step must be an integer >= 0, got {start_step!r}; set token_dropout.start_step to 0 (from the start) or a later training step.")
        if stop_step is not None and (isinstance(stop_step, bool) or not isinstance(stop_step, int) or stop_step <= start_step):
            raise VistokError(f"token dropout stop_step must be null or an integer above start_step ({start_step}), got {stop_step!r}; fix token_dropout.stop_step.")
        self.p = float(p)
        self.min_tokens = min_tokens
        self.distribution = distribution
        self.start_step = start_step
        self.stop_step = stop_step

    def get_config(self) -> dict:
        """Plain constructor kwargs: ``TailTokenDropout(**config)`` rebuilds this module."""
        config = {"p": self.p, "min_tokens": self.min_tokens, "distribution": self.distribution}
        # only when set: configs (and fingerprints) of existing tokenizers stay as they were
        if self.start_step:
            config["start_step"] = self.start_step
        if self.stop_step is not None:
            config["stop_step"] = self.stop_step
        return config

    def candidate_lengths(self, max_tokens: int) -> list[int]:
        """The lengths the distribution can produce for K = ``max_tokens`` (sorted)."""
        self._check_max_tokens(max_tokens)
        if self.distribution == "uniform":
            return list(range(self.min_tokens, max_tokens + 1))
        if self.distribution == "pow2":
            return _powers_of_two_in(self.min_tokens, max_tokens)
        return sorted({min(_next_power_of_two(k), max_tokens) for k in range(self.min_tokens, max_tokens + 1)})

    def sample(self, batch_size: int, max_tokens: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None, step: int | None = None) -> torch.Tensor:
        """(B,) long kept lengths in [min_tokens, K]; K for samples not truncated (prob. 1 - p),
        and K for all outside training steps [start_step, stop_step) (``step`` None: inside).

        Vectorised and sync-free: safe on the training hot path.
        """
        self._check_max_tokens(max_tokens)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if step is not None and (step < self.start_step or (self.stop_step is not None and step >= self.stop_step)):
            return torch.full((batch_size,), max_tokens, dtype=torch.long, device=device)
        if self.distribution == "pow2":
            choices = _powers_of_two_tensor(self.min_tokens, max_tokens, device)
            pick = torch.randint(len(choices), (batch_size,), device=device, generator=generator)
            lengths = choices[pick]
        else:
            lengths = torch.randint(self.min_tokens, max_tokens + 1, (batch_size,), device=device, generator=generator)
            if self.distribution == "uniform_pow2":
                lengths = _round_up_to_power_of_two(lengths).clamp_max(max_tokens)
        truncate = torch.rand(batch_size, device=device, generator=generator) < self.p
        return torch.where(truncate, lengths, torch.full_like(lengths, max_tokens))

    def forward(self, batch_size: int, max_tokens: int, device: torch.device | str | None = None,
                step: int | None = None) -> torch.Tensor:
        return self.sample(batch_size, max_tokens, device, step=step)

    def _check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens < self.min_tokens:
            raise VistokError(f"token dropout min_tokens={self.min_tokens} exceeds the tokenizer's {max_tokens} tokens; lower token_dropout.min_tokens.")

    def extra_repr(self) -> str:
        steps = f", start_step={self.start_step}" if self.start_step else ""
        steps += f", stop_step={self.stop_step}" if self.stop_step is not None else ""
        return f"p={self.p}, min_tokens={self.min_tokens}, distribution={self.distribution!r}{steps}"


def _next_power_of_two(k: int) -> int:
    return 1 << (k - 1).bit_length()


def _powers_of_two_in(low: int, high: int) -> list[int]:
    """Powers of two in [low, high], plus ``high`` itself when it is not one."""
    values = [1 << e for e in range(high.bit_length()) if low <= 1 << e <= high]
    if high not in values:
        values.append(high)
    return values


def _powers_of_two_tensor(low: int, high: int, device: torch.device) -> torch.Tensor:
    """:func:`_powers_of_two_in` built on ``device`` directly (no host-to-device copy per step)."""
    exponents = [e for e in range(high.bit_length()) if low <= 1 << e <= high]
    powers = torch.ones((), dtype=torch.long, device=device) << torch.arange(
        exponents[0] if exponents else 0, exponents[-1] + 1 if exponents else 0, device=device)
    if not exponents or 1 << exponents[-1] != high:
        powers = torch.cat([powers, torch.full((1,), high, dtype=torch.long, device=device)])
    return powers


def _round_up_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= each value (long tensor of values >= 1); exact, no float log2."""
    v = values - 1
    for shift in (1, 2, 4, 8, 16, 32):
        v = v | (v >> shift)
    return v + 1
