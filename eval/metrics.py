"""Reconstruction metrics: PSNR, SSIM, LPIPS, rFID, codebook usage and bits per image.

Every metric here is a torchmetrics ``Metric`` whose states are sums and counts, so evaluation
streams batch by batch (nothing per image is kept) and ``compute()`` reduces the states across
DDP ranks with one all-reduce per state, whatever number of batches each rank saw.

Protocol (stated in README, the same for tokenizers, codecs and image folders):

- Originals and reconstructions are rounded to 8 bits, ``round(clamp(x, 0, 1) * 255) / 255``,
  before every metric, as if both were saved as PNG.
- PSNR is the mean over images of per-image PSNR with data range 1 (not the PSNR of the pooled
  error); identical images count as 100 dB (the MSE is floored at 1e-10).
- SSIM is torchmetrics' SSIM (11x11 Gaussian window, sigma 1.5) with ``data_range=1.0``.
- LPIPS is the ``lpips`` package's VGG variant (v0.1 linear layers), mean over images.
- rFID follows the reference FID evaluators: the 8-bit images go as uint8 into torch-fidelity's
  port of the TF Inception-v3 graph (2015-12-05 weights), which resizes them to 299x299 with
  TF1-compatible bilinear interpolation *without* antialiasing; the 2048-d pool features are
  accumulated in float64 and the Frechet distance is computed in float64.

The Inception and LPIPS networks come from :mod:`vistok.eval.pretrained` (local files only, never
downloaded); without their weights the metric is skipped with one sentence in ``notes``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from vistok.eval.pretrained import load_networks, to_uint8
from vistok.tokenizers.errors import VistokError

PSNR_MSE_FLOOR = 1e-10  # identical images score 100 dB instead of infinity
SOFT_TOKEN_BITS = 16  # a soft token is counted as D 16-bit floats


# --------------------------------------------------------------------------------------------
# Per-image functions


def round_8bit(images: Tensor) -> Tensor:
    """(B, 3, H, W) float -> the same clamped to [0, 1] and rounded to the 256 levels of 8-bit images."""
    return images.clamp(0, 1).mul(255).round().div(255)


def psnr_per_image(preds: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of each image, data range 1, after 8-bit rounding of both.

    preds, target: (B, C, H, W) float in [0, 1]. Returns (B,) float64; at most 100 dB.
    """
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    error = round_8bit(preds.double()) - round_8bit(target.double())
    mse = error.square().flatten(1).mean(dim=1)
    return -10 * torch.log10(mse.clamp_min(PSNR_MSE_FLOOR))


def bits_per_token(codebook_size: int | None, token_dim: int | None = None) -> float:
    """log2(codebook_size) for discrete tokens; token_dim x 16 for soft tokens (16-bit floats)."""
    if codebook_size is not None:
        return math.log2(codebook_size)
    if token_dim is None:
        raise ValueError("soft tokens need token_dim to count their bits")
    return float(token_dim * SOFT_TOKEN_BITS)


def bits_per_image(num_tokens: int, codebook_size: int | None, token_dim: int | None = None) -> float:
    """Bits of ``num_tokens`` tokens: k x log2(codebook_size), or k x D x 16 for soft tokens."""
    return num_tokens * bits_per_token(codebook_size, token_dim)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. mu: (F,), sigma:
    (F, F) symmetric PSD (tensors or arrays). sigma1 sigma2 has the spectrum of the symmetric PSD
    matrix A^T sigma2 A for any A with A A^T = sigma1 (Cholesky factor, or sigma1^(1/2) when sigma1
    is singular, e.g. fewer images than features), so the trace of the square root is the sum of
    square roots of real, non-negative eigenvalues: no complex parts, no epsilon on the diagonal.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    factor, info = torch.linalg.cholesky_ex(sigma1)
    if int(info) != 0:  # singular: the symmetric square root instead (slower)
        evals, evecs = torch.linalg.eigh(sigma1)
        factor = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = factor.T @ sigma2 @ factor
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


# --------------------------------------------------------------------------------------------
# Streaming metrics (torchmetrics states: sums and counts, reduced by "sum" across ranks)


class _HiddenModule:
    """Holds a network outside the module tree: a LightningModule owning an evaluator then does not
    save Inception/VGG weights in its checkpoints. The network follows the data's device on use."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def on(self, device: torch.device) -> nn.Module:
        first = next(self.module.parameters(), None)
        if first is not None and first.device != device:
            self.module.to(device)
        return self.module


class MeanPSNR(Metric):
    """Mean over images of per-image PSNR (dB, data range 1, 8-bit rounded); see :func:`psnr_per_image`."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds, target: (B, 3, H, W) float in [0, 1]."""
        values = psnr_per_image(preds, target)
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class MeanLPIPS(Metric):
    """Mean LPIPS over images. Sum and count states (not torchmetrics' per-image list), so ranks
    that saw different numbers of batches still meet in the same all-reduce at compute()."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, net: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._net = _HiddenModule(net)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds, target: (B, 3, H, W) float in [0, 1], H, W >= 16."""
        if min(preds.shape[-2:]) < 16:
            raise VistokError(f"LPIPS (VGG16) needs images of at least 16x16 pixels, got {preds.shape[-1]}x{preds.shape[-2]}; "
                              "score larger images or turn LPIPS off.")
        net = self._net.on(preds.device)
        values = net(preds.float() * 2 - 1, target.float() * 2 - 1).flatten()
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor': features are computed once outside and fed to several FIDs."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class ReconstructionFID(FrechetInceptionDistance):
    """torchmetrics' FID (float64 sum/outer-product states, DDP "sum" reduction) fed with Inception
    features computed once per batch, so the originals' features serve every token count.

    update(features (B, 2048), real: bool). compute() -> float64 scalar: the Frechet distance of
    the accumulated statistics by :func:`frechet_distance` (eigenvalues of a symmetric matrix, so
    no complex square roots, also for rank-deficient covariances), NaN with fewer than two images
    on either side. Also usable alone: ``ReconstructionFID().update(features, real=True)``.
    """

    def __init__(self, num_features: int = 2048, **kwargs: Any) -> None:
        super().__init__(feature=_PrecomputedFeatures(num_features), normalize=False, **kwargs)

    def compute(self) -> Tensor:
        n_real, n_fake = self.real_features_num_samples, self.fake_features_num_samples
        if n_real < 2 or n_fake < 2:
            return torch.tensor(float("nan"), dtype=torch.float64)
        mean_real = self.real_features_sum / n_real
        mean_fake = self.fake_features_sum / n_fake
        cov_real = (self.real_features_cov_sum - n_real * torch.outer(mean_real, mean_real)) / (n_real - 1)
        cov_fake = (self.fake_features_cov_sum - n_fake * torch.outer(mean_fake, mean_fake)) / (n_fake - 1)
        return torch.tensor(frechet_distance(mean_real, cov_real, mean_fake, cov_fake), dtype=torch.float64)


class CodebookUsage(Metric):
    """Codebook usage (fraction of codes used at least once) and perplexity over everything seen.

    The state is one int64 count per code (8 bytes x codebook_size), summed across ranks.
    update(indices: long, any shape). compute() -> {"usage": in [0, 1], "perplexity": in [1, codebook_size]}
    (both NaN when no index was seen).
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, codebook_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.codebook_size = int(codebook_size)
        self.add_state("counts", torch.zeros(self.codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:
        flat = indices.reshape(-1).long()
        # index_add_ instead of bincount: no codebook-sized temporary per batch
        self.counts.index_add_(0, flat, torch.ones_like(flat))

    def compute(self) -> dict[str, Tensor]:
        counts = self.counts.double()
        total = counts.sum()
        if total == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {"usage": nan, "perplexity": nan.clone()}
        probs = counts / total
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum()
        return {"usage": (self.counts > 0).double().mean(), "perplexity": entropy.exp()}


# --------------------------------------------------------------------------------------------
# The evaluator used by `vistok score`, rate-distortion and training validation


class ReconstructionEvaluator(nn.Module):
    """Reconstruction metrics for several token counts, streamed and DDP-reduced.

    One group of torchmetrics per token count: PSNR and SSIM always; LPIPS when an LPIPS network
    is given; rFID when an Inception network is given; codebook usage and perplexity when
    ``codebook_size`` is given and indices are passed. The Inception and LPIPS networks are not
    submodules (a LightningModule holding the evaluator saves none of their weights); they follow
    the images' device. Metric states are non-persistent buffers that move with ``.to(device)``.

    ``notes`` holds one sentence per skipped metric (e.g. missing weights). Token counts are int
    labels; a codec or an image folder uses the same class with labels of its own.

    Example (training validation)::

        evaluator = ReconstructionEvaluator.for_tokenizer(tokenizer, [8, 32, 128])
        recon = {k: tokenizer.decode(tokens[:, :k]) for k in evaluator.token_counts}
        evaluator.update(images, recon, indices=tokens)    # every validation batch
        results = evaluator.compute()                      # {8: {"psnr": ..., "rfid": ...}, ...}
        evaluator.reset()
    """

    def __init__(self, token_counts: Sequence[int], *, codebook_size: int | None = None, token_dim: int | None = None,
                 inception: nn.Module | None = None, lpips: nn.Module | None = None, ssim: bool = True,
                 notes: Sequence[str] = ()) -> None:
        super().__init__()
        self.token_counts = sorted({int(k) for k in token_counts})
        if not self.token_counts:
            raise ValueError("ReconstructionEvaluator needs at least one token count")
        self.codebook_size = codebook_size
        self.token_dim = token_dim
        self.notes = list(notes)
        self._inception = _HiddenModule(inception) if inception is not None else None
        groups = {}
        for k in self.token_counts:
            pairs: dict[str, Metric] = {"psnr": MeanPSNR()}
            if ssim:
                pairs["ssim"] = StructuralSimilarityIndexMeasure(data_range=1.0)
            if lpips is not None:
                pairs["lpips"] = MeanLPIPS(lpips)
            group = nn.ModuleDict({"pairs": MetricCollection(pairs, compute_groups=False)})
            if inception is not None:
                group["rfid"] = ReconstructionFID(getattr(inception, "num_features", 2048))
            if codebook_size is not None:
                group["usage"] = CodebookUsage(codebook_size)
            groups[str(k)] = group
        self.groups = nn.ModuleDict(groups)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, token_counts: Sequence[int] | None = None, *,
                      inception_weights: str | Path | bool | None = None, lpips_weights: str | Path | bool | None = None,
                      ssim: bool = True) -> ReconstructionEvaluator:
        """An evaluator for ``tokenizer`` (anything with max_tokens, codebook_size, token_dim).

        token_counts: default all K only. *_weights: None looks in the torch hub cache, a path
        loads that file, False turns the metric off. Missing weights become ``notes``.
        """
        inception, lpips, notes = load_networks(inception_weights, lpips_weights)
        counts = [tokenizer.max_tokens] if token_counts is None else token_counts
        return cls(counts, codebook_size=tokenizer.codebook_size, token_dim=tokenizer.token_dim,
                   inception=inception, lpips=lpips, ssim=ssim, notes=notes)

    @property
    def has_fid(self) -> bool:
        return self._inception is not None

    def inception_features(self, images: Tensor, chunk: int = 256) -> Tensor:
        """(N, 3, H, W) [0, 1] -> (N, F) float32 Inception pool features (autocast off), ``chunk`` images per pass."""
        if self._inception is None:
            raise RuntimeError("this evaluator has no Inception network")
        net = self._inception.on(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return torch.cat([net(to_uint8(part.float())) for part in images.split(chunk)])

    @torch.no_grad()
    def update(self, images: Tensor, reconstructions: Mapping[int, Tensor] | Tensor, indices: Tensor | None = None) -> None:
        """Add a batch.

        images: (B, 3, H, W) originals in [0, 1]. reconstructions: {token count: (B, 3, H, W)},
        or one tensor when the evaluator tracks a single count. Values outside [0, 1] are clamped.
        Passing all counts in one call runs Inception once over the originals and all of them.
        indices: (B, >= max count) long token indices (the prefix of length k counts for k).
        """
        if isinstance(reconstructions, Tensor):
            if len(self.token_counts) != 1:
                raise ValueError(f"pass a dict {{token count: reconstruction}} for the counts {self.token_counts}")
            reconstructions = {self.token_counts[0]: reconstructions}
        unknown = [k for k in reconstructions if str(int(k)) not in self.groups]
        if unknown:
            raise ValueError(f"token count {unknown[0]} is not tracked; this evaluator tracks {self.token_counts}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            target = round_8bit(images.float())
            preds = {int(k): round_8bit(recon.float()) for k, recon in reconstructions.items()}
            if self.has_fid:
                features = self.inception_features(torch.cat([target, *preds.values()])).split(target.shape[0])
                real, fakes = features[0], dict(zip(preds, features[1:]))
            for k, pred in preds.items():
                group = self.groups[str(k)]
                group["pairs"].update(pred, target)
                if self.has_fid:
                    group["rfid"].update(real, real=True)
                    group["rfid"].update(fakes[k], real=False)
                if indices is not None and "usage" in group:
                    group["usage"].update(indices[:, :k])

    def compute(self) -> dict[int, dict[str, float]]:
        """{token count: {"psnr", "ssim", ["lpips"], ["rfid"], ["usage", "perplexity"], ["bits_per_image"]}}.

        Values are Python floats (NaN where nothing was seen). Under DDP every rank must call this.
        """
        results: dict[int, dict[str, float]] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")  # a rank without batches
            for k in self.token_counts:
                group = self.groups[str(k)]
                values = {name: float(v) for name, v in group["pairs"].compute().items()}
                if "rfid" in group:
                    values["rfid"] = float(group["rfid"].compute())
                if "usage" in group:  # computed on every rank alike; NaN (dropped) when no indices were passed
                    usage = {name: float(v) for name, v in group["usage"].compute().items()}
                    values.update({name: v for name, v in usage.items() if math.isfinite(v)})
                if self.codebook_size is not None or self.token_dim is not None:
                    values["bits_per_image"] = bits_per_image(k, self.codebook_size, self.token_dim)
                results[k] = values
        return results

    def reset(self) -> None:
        """Clear every state (call between validation epochs)."""
        for group in self.groups.values():
            for metric in group.values():
                metric.reset()
