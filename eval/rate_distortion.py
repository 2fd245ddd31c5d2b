"""Rate-distortion of a tokenizer against JPEG, WebP and a thumbnail, and quality-controlled token counts.

For each batch the tokens are encoded once at the maximum K; every requested prefix length is
decoded from them in batched decodes (the prefixes are stacked along the batch dimension with
``decode``'s ``lengths``). JPEG and WebP compress the same images at the highest quality whose
file fits in each token count's bytes (searched per image); where even quality 1 does not fit,
the row says so (``within_budget`` < 1) and is no equal-rate comparison. The thumbnail codec
stores the largest 8-bit thumbnail within the bits and reaches every rate. ``--target-psnr`` picks, per
image, the smallest token count reaching the target, by a binary search over prefix lengths that
decodes the whole batch at every step. ``--perturb`` decodes the largest scored prefix again with a
fraction of its tokens replaced by other codes (:mod:`vistok.tokenizers.token_perturb`), one row per rate.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vistok.eval.baselines import CODECS, codec_at_bytes, thumbnail_bits, thumbnail_reconstruct
from vistok.eval.metrics import ReconstructionEvaluator, bits_per_image, bits_per_token, psnr_per_image
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.token_perturb import check_discrete, check_kind, check_rate, perturbed_variants


# Two default lists of token counts, for two jobs: a rate-distortion curve wants many points (its
# x axis is log bits), training validation a few cheap ones every interval.


def power_of_two_token_counts(max_tokens: int) -> list[int]:
    """Powers of two up to ``max_tokens``, plus ``max_tokens`` itself: K=48 -> [1, 2, 4, 8, 16, 32, 48].

    The default of ``vistok score`` and :func:`rate_distortion`.
    """
    counts = [2**i for i in range(int(math.log2(max_tokens)) + 1) if 2**i <= max_tokens]
    return sorted(set(counts) | {max_tokens})


def halving_token_counts(max_tokens: int) -> list[int]:
    """K/8, K/4, K/2 and K (rounded down, at least 1, without repeats): K=48 -> [6, 12, 24, 48].

    The default of training validation (``validation.token_counts: null``).
    """
    return sorted({max(1, max_tokens // d) for d in (8, 4, 2, 1)})


def parse_token_counts(value: str | Sequence[int] | None, max_tokens: int, prefixes: bool = True) -> list[int]:
    """Token counts from "8,16,32" (or a sequence), checked against 1..max_tokens; None -> the powers
    of two, or only ``max_tokens`` for a tokenizer that decodes no prefixes (``prefixes=False``, a 2D
    grid decoder without a mask token, whose ``decode`` refuses fewer tokens)."""
    if value is None:
        return power_of_two_token_counts(max_tokens) if prefixes else [max_tokens]
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    counts = []
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.isdigit())):
            raise VistokError(f"--num-tokens takes comma-separated whole numbers such as 8,16,32, got {item!r}; list token counts from 1 to {max_tokens}.")
        counts.append(int(item))
    if not counts:
        raise VistokError(f"--num-tokens is empty; list token counts from 1 to {max_tokens} such as 8,16,32.")
    bad = [k for k in counts if not 1 <= k <= max_tokens]
    if bad:
        raise VistokError(f"token count {bad[0]} is outside 1..{max_tokens}, the range this tokenizer decodes; choose counts from 1 to {max_tokens}.")
    return sorted(set(counts))


def decode_prefixes(tokenizer: Any, tokens: Tensor, counts: Sequence[int], max_batch: int | None = None) -> dict[int, Tensor]:
    """Decode several prefix lengths of the same tokens in stacked batches.

    tokens: (B, K) long or (B, K, D) float, as ``encode`` returned them. The prefixes are stacked
    along the batch dimension (row c*B + b is image b at length counts[c]) and decoded in chunks of
    at most ``max_batch`` rows (default: all at once). Returns {k: (B, 3, H, W) in [0, 1]}.
    """
    batch = tokens.shape[0]
    lengths = torch.tensor(list(counts), dtype=torch.long, device=tokens.device).repeat_interleave(batch)
    stacked = tokens.repeat(len(counts), *([1] * (tokens.ndim - 1)))
    step = max_batch or stacked.shape[0]
    images = torch.cat([tokenizer.decode(stacked[i:i + step], lengths=lengths[i:i + step]) for i in range(0, stacked.shape[0], step)])
    return {int(k): images[c * batch:(c + 1) * batch] for c, k in enumerate(counts)}


def choose_lengths(tokenizer: Any, images: Tensor, target_psnr: float, tokens: Tensor | None = None,
                   candidates: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Per image, the smallest token count whose reconstruction reaches ``target_psnr`` dB.

    images: (B, 3, H, W) in [0, 1]. tokens: the full-length tokens if already encoded.
    candidates: allowed counts (default every count 1..K). Binary search over the candidates, for
    all images at once: each step decodes the batch with per-image ``lengths``, so the cost is
    about log2(len(candidates)) + 1 decodes. It assumes PSNR grows with the prefix length, which
    tail-token training makes (nearly) true; an image that never reaches the target gets the
    largest candidate. Returns (lengths (B,) long, psnr at those lengths (B,) float64).
    """
    if tokens is None:
        tokens = tokenizer.encode(images)
    options = torch.tensor(sorted(set(candidates or range(1, tokenizer.max_tokens + 1))), dtype=torch.long, device=images.device)
    lo = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    hi = torch.full_like(lo, len(options) - 1)
    while bool((lo < hi).any()):  # invariant: the answer's index lies in [lo, hi]
        mid = (lo + hi) // 2
        reached = psnr_per_image(tokenizer.decode(tokens, lengths=options[mid]), images) >= target_psnr
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, torch.minimum(mid + 1, hi))
    lengths = options[lo]
    return lengths, psnr_per_image(tokenizer.decode(tokens, lengths=lengths), images)


def summarize_lengths(lengths: Tensor, psnr: Tensor, target_psnr: float, codebook_size: int | None,
                      token_dim: int | None) -> dict[str, Any]:
    """Distribution of chosen token counts (all images), mean bits per image, how many reached the target."""
    lengths = lengths.long().cpu()
    values, counts = torch.unique(lengths, return_counts=True)
    per_token = bits_per_token(codebook_size, token_dim)
    quantiles = torch.quantile(lengths.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        "target_psnr": float(target_psnr),
        "num_images": int(lengths.numel()),
        "mean_tokens": float(lengths.double().mean()),
        "tokens_p10": float(quantiles[0]),
        "tokens_median": float(quantiles[1]),
        "tokens_p90": float(quantiles[2]),
        "histogram": {int(v): int(c) for v, c in zip(values, counts)},
        "mean_bits_per_image": float(lengths.double().mean() * per_token),
        "mean_psnr": float(psnr.double().mean()),
        "fraction_reached": float((psnr >= target_psnr).double().mean()),
    }


@torch.no_grad()
def adaptive_lengths(tokenizer: Any, batches: Iterable[Tensor], target_psnr: float, *, candidates: Sequence[int] | None = None,
                     device: str | torch.device = "cpu") -> tuple[dict[str, Any], Tensor]:
    """Quality-controlled token counts over an image set: :func:`choose_lengths` on every batch.

    batches: iterable of (B, 3, S, S) images in [0, 1]. Returns (:func:`summarize_lengths`'s
    summary, the chosen length of every image (N,) long in input order).
    """
    tokenizer = tokenizer.to(device).eval()
    lengths, psnr = [], []
    for images in batches:
        chosen, reached = choose_lengths(tokenizer, images.to(device, torch.float32), target_psnr, candidates=candidates)
        lengths.append(chosen.cpu())
        psnr.append(reached.cpu())
    if not lengths:
        raise VistokError("no images to choose token counts for; pass at least one batch of images.")
    all_lengths = torch.cat(lengths)
    return summarize_lengths(all_lengths, torch.cat(psnr), target_psnr, tokenizer.codebook_size, tokenizer.token_dim), all_lengths


# The baselines `vistok score` can compare with: the Pillow codecs and the equal-bits thumbnail.
BASELINES = (*CODECS, "thumbnail")


@dataclass
class RateDistortionResult:
    """rows: one dict per (method, token count): method ("tokenizer" | "jpeg" | "webp" | "thumbnail"),
    num_tokens, bits_per_image, bytes_per_image, quality (codecs: mean chosen quality),
    within_budget (baselines: fraction of images whose file fits in the tokens' bytes), psnr, ssim,
    lpips, rfid, usage, perplexity (None where not measured). adaptive: :func:`summarize_lengths` or None.
    examples: {"original": (N, 3, H, W), k: (N, 3, H, W)} for the first N images (CPU)."""

    token_counts: list[int]
    num_images: int
    rows: list[dict[str, Any]]
    adaptive: dict[str, Any] | None
    examples: dict[Any, Tensor]
    notes: list[str] = field(default_factory=list)


ROW_FIELDS = ("method", "num_tokens", "perturb_rate", "bits_per_image", "bytes_per_image", "quality", "within_budget",
              "psnr", "ssim", "lpips", "rfid", "usage", "perplexity")


def _row(method: str, k: int, bits: float, nbytes: float, quality: float | None, values: dict[str, float],
         within_budget: float | None = None, perturb_rate: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in ROW_FIELDS}
    row.update(method=method, num_tokens=k, bits_per_image=bits, bytes_per_image=nbytes, quality=quality,
               within_budget=within_budget, perturb_rate=perturb_rate)
    for name in ("psnr", "ssim", "lpips", "rfid", "usage", "perplexity"):
        value = values.get(name)
        row[name] = value if value is not None and math.isfinite(value) else None
    return row


@torch.no_grad()
def rate_distortion(tokenizer: Any, batches: Iterable[Tensor], token_counts: Sequence[int] | None = None, *,
                    device: str | torch.device = "cpu", inception: nn.Module | None = None, lpips: nn.Module | None = None,
                    codecs: Sequence[str] = BASELINES, target_psnr: float | None = None, num_examples: int = 8,
                    notes: Sequence[str] = (), on_batch: Callable[[int], None] | None = None,
                    perturb: Sequence[float] = (), perturb_kind: str = "random", perturb_k: int | None = None,
                    seed: int = 0) -> RateDistortionResult:
    """Score ``tokenizer`` at several token counts against baselines at the same rate.

    batches: iterable of (B, 3, S, S) float images in [0, 1], S = tokenizer.image_size.
    token_counts: default :func:`power_of_two_token_counts`. inception / lpips: networks from
    :func:`vistok.eval.pretrained.load_inception` / :func:`vistok.eval.pretrained.load_lpips` (None skips the metric).
    codecs: any of :data:`BASELINES`: JPEG/WebP within the tokens' bytes, the thumbnail within
    their bits. target_psnr: also run :func:`choose_lengths` on every image. on_batch(n_images) is called
    after each batch (progress bars). Baselines get PSNR, SSIM and LPIPS; the tokenizer also rFID
    and, for discrete tokens, codebook usage and perplexity.
    perturb: rates in [0, 1]; each adds a row ``perturbed-<perturb_kind>`` at the largest token count
    with that fraction of each image's tokens replaced (:func:`perturbed_variants`, ``perturb_k`` the
    VQ neighbourhood), drawn from a generator seeded with ``seed``; rate 0 decodes the clean tokens.
    """
    device = torch.device(device)
    counts = parse_token_counts(token_counts, tokenizer.max_tokens, getattr(tokenizer, "decodes_prefixes", True))
    for codec in codecs:
        if codec not in BASELINES:
            raise VistokError(f"unknown codec {codec!r}; choose from {', '.join(BASELINES)}.")
    rates = sorted({check_rate(rate, "every --perturb rate") for rate in perturb})
    if rates:
        check_discrete(tokenizer.quantizer)
        if check_kind(perturb_kind) == "nearest":
            tokenizer.quantizer.neighbourhood_size(perturb_k)
    tokenizer = tokenizer.to(device).eval()
    codebook_size, token_dim = tokenizer.codebook_size, tokenizer.token_dim
    bits = {k: bits_per_image(k, codebook_size, token_dim) for k in counts}
    # labels 0..R-1 stand for the rates; one CPU generator, so the draws do not depend on the device
    perturbed = ReconstructionEvaluator(range(len(rates)), inception=inception, lpips=lpips).to(device) if rates else None
    generator = torch.Generator().manual_seed(seed)
    ours = ReconstructionEvaluator(counts, codebook_size=codebook_size, token_dim=token_dim, inception=inception, lpips=lpips).to(device)
    baselines = {codec: ReconstructionEvaluator(counts, lpips=lpips).to(device) for codec in codecs}
    codec_bytes = {codec: torch.zeros(len(counts), dtype=torch.float64) for codec in codecs}
    codec_quality = {codec: torch.zeros(len(counts), dtype=torch.float64) for codec in codecs}
    codec_fits = {codec: torch.zeros(len(counts), dtype=torch.float64) for codec in codecs}
    chosen_lengths: list[Tensor] = []
    chosen_psnr: list[Tensor] = []
    examples: dict[Any, list[Tensor]] = {"original": [], **{k: [] for k in counts}}
    seen = 0

    for images in batches:
        images = images.to(device, torch.float32)
        tokens = tokenizer.encode(images)
        recon = decode_prefixes(tokenizer, tokens, counts, max_batch=max(images.shape[0], 1) * 4)
        ours.update(images, recon, indices=tokens if not tokens.is_floating_point() else None)
        if perturbed is not None:
            clean = tokens[:, :counts[-1]]
            variants = perturbed_variants(tokenizer.quantizer, clean, rates, perturb_kind, perturb_k, generator)
            # unchanged tokens (rate 0, or a rate below one token) reuse the clean reconstruction: no decode, and
            # the row equals the clean one exactly on any device (a decode at another batch size may differ in the last bits)
            perturbed.update(images, {i: recon[counts[-1]] if torch.equal(variant, clean) else tokenizer.decode(variant)
                                      for i, variant in enumerate(variants)})
        for codec in codecs:
            if codec == "thumbnail":
                height, width = images.shape[-2:]
                baselines[codec].update(images, {k: thumbnail_reconstruct(images, bits[k]) for k in counts})
                codec_bytes[codec] += torch.tensor([thumbnail_bits(height, width, bits[k]) / 8 * images.shape[0] for k in counts],
                                                   dtype=torch.float64)
                codec_fits[codec] += images.shape[0]
                continue
            matches = codec_at_bytes(images.cpu(), codec, [bits[k] / 8 for k in counts])
            baselines[codec].update(images, {k: m.reconstruction.to(device) for k, m in zip(counts, matches)})
            codec_bytes[codec] += torch.stack([m.nbytes.double().sum() for m in matches])
            codec_quality[codec] += torch.stack([m.quality.double().sum() for m in matches])
            codec_fits[codec] += torch.stack([m.fits.double().sum() for m in matches])
        if target_psnr is not None:
            lengths, psnr = choose_lengths(tokenizer, images, target_psnr, tokens=tokens)
            chosen_lengths.append(lengths.cpu())
            chosen_psnr.append(psnr.cpu())
        take = min(num_examples - min(seen, num_examples), images.shape[0])
        if take > 0:
            examples["original"].append(images[:take].cpu())
            for k in counts:
                examples[k].append(recon[k][:take].cpu())
        seen += images.shape[0]
        if on_batch is not None:
            on_batch(images.shape[0])

    if seen == 0:
        raise VistokError("the data source yielded no images; point DATA at a folder, shards or 'sample' that holds images.")
    rows = []
    tokenizer_results = ours.compute()
    for k in counts:
        rows.append(_row("tokenizer", k, bits[k], bits[k] / 8, None, tokenizer_results[k]))
    if perturbed is not None:
        k = counts[-1]
        rows += [_row(f"perturbed-{perturb_kind}", k, bits[k], bits[k] / 8, None, values, perturb_rate=rates[i])
                 for i, values in perturbed.compute().items()]
    all_notes = list(notes)
    for codec in codecs:
        results = baselines[codec].compute()
        quality = None if codec == "thumbnail" else codec_quality[codec] / seen
        for c, k in enumerate(counts):
            rows.append(_row(codec, k, float(codec_bytes[codec][c] / seen * 8), float(codec_bytes[codec][c] / seen),
                             None if quality is None else float(quality[c]), results[k], float(codec_fits[codec][c] / seen)))
        over = [c for c in range(len(counts)) if codec_fits[codec][c] < seen]
        if over:
            worst = over[-1]
            all_notes.append(
                f"{codec} cannot reach the tokens' rate at k = {', '.join(str(counts[c]) for c in over)}: even at quality 1 "
                f"{1 - float(codec_fits[codec][worst] / seen):.0%} of its files exceed the tokens' {bits[counts[worst]] / 8:.1f} bytes "
                f"at k = {counts[worst]}; those rows spend more bytes than the tokenizer, so they are no equal-rate comparison "
                "(within_budget < 1)."
            )
    adaptive = None
    if target_psnr is not None:
        adaptive = summarize_lengths(torch.cat(chosen_lengths), torch.cat(chosen_psnr), target_psnr, codebook_size, token_dim)
    if seen < 2 and inception is not None:
        all_notes.append("rFID needs at least two images; score more images to get it.")
    return RateDistortionResult(
        token_counts=counts,
        num_images=seen,
        rows=rows,
        adaptive=adaptive,
        examples={key: torch.cat(parts) for key, parts in examples.items() if parts},
        notes=all_notes,
    )
