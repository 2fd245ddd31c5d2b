"""eval/: metrics, FID, codec baselines, rate-distortion, adaptive length and `vistok score`.

No test downloads anything. Where FID is involved the Inception network is torch-fidelity's FID
Inception-v3 architecture *randomly initialised* (FIDInceptionV3(None)): it checks the pipeline
(8-bit rounding, TF1 resize, float64 statistics, Frechet distance), not the pretrained weights.
Most FID tests read its 64-d first pool layer to stay fast on a CPU; one checks the 2048-d path.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import vistok.cli as vistok_cli
from vistok.eval import baselines, metrics, pretrained, score
from vistok.eval.metrics import (
    CodebookUsage,
    MeanPSNR,
    ReconstructionEvaluator,
    ReconstructionFID,
    bits_per_image,
    frechet_distance,
    psnr_per_image,
)
from vistok.eval.pretrained import FIDInceptionV3
from vistok.eval.rate_distortion import (
    adaptive_lengths,
    choose_lengths,
    decode_prefixes,
    halving_token_counts,
    parse_token_counts,
    power_of_two_token_counts,
    rate_distortion,
)
from vistok.tokenizers.atomic import atomic_write_json
from vistok.tokenizers.errors import VistokError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Helpers and fixtures


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: smooth colours plus a little grey texture, photo-like enough for codecs."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
    freq = 2 + 4 * torch.rand(n, 3, 1, 1, generator=g)
    base = 0.5 + 0.35 * torch.sin(freq * x + phase) * torch.cos(freq * y - phase)
    return (base + 0.04 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


class DCTTokenizer:
    """A stand-in tokenizer with an exact progressive code (no training needed).

    Soft tokens: token t holds the t-th group of orthonormal 2D DCT coefficients, lowest
    frequencies first, for all three channels. Decoding a prefix zeroes the rest, so PSNR grows
    with the prefix length and a flat image is exact from its first token (the DC term).
    Implements the ImageTokenizer interface that eval/ relies on.
    """

    def __init__(self, image_size: int = 32, max_tokens: int = 16) -> None:
        n = image_size
        k = torch.arange(n, dtype=torch.float64)
        dct = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
        dct[0] /= math.sqrt(2)
        basis = torch.einsum("ux,vy->uvxy", dct, dct).reshape(n * n, n * n)
        u, v = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        order = torch.argsort((u + v).flatten() * n + u.flatten())
        self.basis = basis[order].float()  # (HW, HW), rows by increasing frequency
        self.image_size, self.max_tokens = n, max_tokens
        self.codebook_size, self.token_dim = None, 3 * n * n // max_tokens
        self.is_discrete, self.arch = False, "dct"

    def to(self, device):  # noqa: ARG002 - CPU only
        return self

    def eval(self):
        return self

    def encode(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        coeffs = images.flatten(2) @ self.basis.T  # (B, 3, HW)
        tokens = coeffs.transpose(1, 2).reshape(images.shape[0], self.max_tokens, self.token_dim)
        return tokens[:, : num_tokens or self.max_tokens]

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, k, _ = tokens.shape
        full = torch.zeros(b, self.max_tokens, self.token_dim)
        full[:, :k] = tokens
        if lengths is not None:
            full = full * (torch.arange(self.max_tokens)[None, :] < lengths[:, None])[..., None]
        coeffs = full.reshape(b, -1, 3).transpose(1, 2)
        return (coeffs @ self.basis).reshape(b, 3, self.image_size, self.image_size).clamp(0, 1)


@pytest.fixture(scope="module")
def inception64() -> FIDInceptionV3:
    # Randomly initialised FID Inception (no download), 64-d features for speed.
    return FIDInceptionV3(None, features=64)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from vistok.tokenizers.model import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer(image_size=16, num_tokens=8).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer) -> Path:
    """A checkpoint shaped like the training module's (see the contract), of an untrained tokenizer."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    state = tiny_tokenizer.state_dict()
    torch.save({
        "hyper_parameters": {"tokenizer": tiny_tokenizer.config},
        "state_dict": {f"tokenizer.{k}": v for k, v in state.items()},
        "ema_state_dict": state,
        "vistok": {"metrics": {}, "step": 0, "version": "test"},
    }, path)
    return path


def write_images(folder: Path, n: int, size: tuple[int, int] = (20, 24), ext: str = "png", seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(folder / f"img{i}.{ext}")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), 5)


@pytest.fixture()
def no_weights(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, so rFID and LPIPS are skipped as on a fresh machine."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


# --------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("n", [10, 200])  # rank-deficient and full-rank covariances
def test_frechet_distance_matches_scipy_reference(n):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n, 32))
    b = rng.normal(size=(n, 32)) @ rng.normal(scale=0.4, size=(32, 32)) + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(inception64):
    images = metrics.round_8bit(smooth_images(6))  # 8-bit originals, as loaded from files
    noise = torch.randn_like(images)
    evaluator = ReconstructionEvaluator([0, 1, 2, 3], inception=inception64)
    evaluator.update(images, {
        0: images,
        1: images + 0.4 / 255 * noise.sign(),  # below half an 8-bit step: rounding removes it
        2: images + 0.05 * noise,
        3: images + 0.2 * noise,
    })
    fid = {k: v["rfid"] for k, v in evaluator.compute().items()}
    scale = fid[3]
    assert abs(fid[0]) < 1e-6 * scale and fid[1] == fid[0]
    assert 1e-4 * scale < fid[2] < fid[3]
    fid_metric = evaluator.groups["0"]["rfid"]
    assert isinstance(fid_metric, ReconstructionFID) and fid_metric.real_features_cov_sum.dtype == torch.float64


def test_missing_weights_give_a_sentence_and_bad_files_an_error(tmp_path, no_weights):
    net, note = pretrained.load_inception()
    assert net is None and str(no_weights) in note and pretrained.INCEPTION_URL in note and "--inception-weights" in note
    net, note = pretrained.load_lpips()
    assert net is None and pretrained.VGG16_FILENAME in note and "--lpips-weights" in note
    with pytest.raises(VistokError, match="do not exist"):
        pretrained.load_inception(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"<html>not weights</html>")
    with pytest.raises(VistokError, match="cannot be read"):
        pretrained.load_lpips(bad)


def test_fid_inception_loads_from_a_file_and_resizes_the_tf1_way(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    calls = []
    original = tf_inception.interpolate_bilinear_2d_like_tensorflow1x

    def spy(x, size=None, **kwargs):
        calls.append((x.dtype, size, kwargs.get("align_corners")))
        return original(x, size=size, **kwargs)

    monkeypatch.setattr(tf_inception, "interpolate_bilinear_2d_like_tensorflow1x", spy)
    # A weights file made here from a randomly initialised network of the same architecture.
    random_net = FIDInceptionV3(None)
    torch.save(random_net.state_dict(), tmp_path / "inception.pth")
    loaded, note = pretrained.load_inception(tmp_path / "inception.pth")
    assert note is None and loaded.num_features == 2048
    images = smooth_images(2)
    features = loaded(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert calls == [(torch.float32, (299, 299), False)]  # TF1 bilinear, no antialiasing
    assert torch.equal(features, random_net(pretrained.to_uint8(images)))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.train().training


def test_lpips_loads_its_vgg16_backbone_from_a_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    # torchvision's VGG16 feature layers, randomly initialised, saved under the checkpoint's key names.
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, tmp_path / "vgg16.pth")
    lpips_net, note = pretrained.load_lpips(tmp_path / "vgg16.pth")
    images = smooth_images(2)
    same = lpips_net(images * 2 - 1, images * 2 - 1).flatten()
    noisy = lpips_net(images * 2 - 1, (images + 0.2 * torch.randn_like(images)).clamp(0, 1) * 2 - 1).flatten()
    assert note is None and torch.allclose(same, torch.zeros(2), atol=1e-6) and (noisy > 0).all()
    metric = metrics.MeanLPIPS(lpips_net)
    metric.update(images, images)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-6)


def test_psnr_is_the_mean_of_per_image_psnr_after_8bit_rounding():
    images = smooth_images(2)
    recon = images.clone()
    recon[1] = (recon[1] + 0.1 * torch.randn_like(recon[1])).clamp(0, 1)
    per_image = psnr_per_image(recon, images)
    assert per_image[0] == pytest.approx(100.0)  # identical: capped, not infinite
    mse = ((metrics.round_8bit(recon[1]) - metrics.round_8bit(images[1])) ** 2).double().mean()
    assert per_image[1] == pytest.approx(float(-10 * torch.log10(mse)), rel=1e-6)
    metric = MeanPSNR()
    metric.update(recon[:1], images[:1])
    metric.update(recon[1:], images[1:])
    assert float(metric.compute()) == pytest.approx(float(per_image.mean()))
    pooled = -10 * math.log10(float(((recon - images) ** 2).mean()))
    assert float(metric.compute()) != pytest.approx(pooled, rel=0.05)


def test_bits_codebook_usage_and_perplexity():
    assert bits_per_image(32, 4096) == pytest.approx(32 * 12)
    assert bits_per_image(8, None, token_dim=12) == 8 * 12 * 16
    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 1], [0, 1]]))
    usage.update(torch.tensor([[2, 3]]))
    values = usage.compute()
    assert float(values["usage"]) == 0.5
    probs = np.array([2, 2, 1, 1]) / 6
    assert float(values["perplexity"]) == pytest.approx(math.exp(-(probs * np.log(probs)).sum()))


def test_evaluator_saves_no_network_weights_and_reports_skipped_metrics(no_weights, inception64, tiny_tokenizer):
    evaluator = ReconstructionEvaluator([2, 8], codebook_size=1000, token_dim=4, inception=inception64)
    assert evaluator.state_dict() == {}  # a LightningModule holding it keeps its checkpoints small
    images = smooth_images(3, size=16)
    tokens = torch.randint(0, 1000, (3, 8))
    evaluator.update(images, {2: images, 8: images}, indices=tokens)
    results = evaluator.compute()
    assert set(results) == {2, 8}
    assert {"psnr", "ssim", "rfid", "usage", "perplexity", "bits_per_image"} <= set(results[8])
    assert results[2]["usage"] <= results[8]["usage"] and results[8]["bits_per_image"] == pytest.approx(8 * math.log2(1000))
    evaluator.reset()
    assert math.isnan(evaluator.compute()[8]["psnr"])

    skipped = ReconstructionEvaluator.for_tokenizer(tiny_tokenizer, [4])
    assert len(skipped.notes) == 2 and all("skipped" in n for n in skipped.notes)
    skipped.update(images, images.flip(0))  # one tensor: the evaluator's only token count
    assert set(skipped.compute()[4]) == {"psnr", "ssim", "bits_per_image"}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    evaluator = ReconstructionEvaluator([4], codebook_size=16)
    for _ in range(2 if rank == 0 else 0):  # rank 1 sees no batch at all
        images = torch.rand(2, 3, 16, 16)
        evaluator.update(images, images, indices=torch.randint(0, 16, (2, 4)))
    torch.save(evaluator.compute(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run_two_ranks(worker, out: Path) -> None:
    """Run ``worker(rank, 2, port, out)`` in two gloo processes; fail when one hangs or fails."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imported modules instead of importing torch again
    context = mp.start_processes(worker, args=(2, port, str(out)), nprocs=2, join=False, start_method="fork")
    for process in context.processes:
        process.join(timeout=120)
    assert all(p.exitcode == 0 for p in context.processes), "a rank hung or failed"


def test_ddp_compute_does_not_hang_when_ranks_saw_different_batches(tmp_path):
    _run_two_ranks(_ddp_worker, tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0 == r1 and r0[4]["psnr"] == pytest.approx(100.0)


def _rank_data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rank 0 sees two batches, rank 1 one; reconstructions are noisy copies (about 20 dB), not the images."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(2 if rank == 0 else 1):
        images = torch.rand(2, 3, 16, 16, generator=generator)
        noise = 0.03 * (1 + rank) * torch.randn(2, 3, 16, 16, generator=generator)
        batches.append((images, (images + noise).clamp(0, 1), torch.randint(0, 16, (2, 4), generator=generator)))
    return batches


def _ddp_uneven_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    evaluator = ReconstructionEvaluator([4], codebook_size=16)
    for images, recon, indices in _rank_data(rank):
        evaluator.update(images, recon, indices=indices)
    torch.save(evaluator.compute(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_metrics_equal_one_process_over_all_ranks_images(tmp_path):
    """Each metric's totals and counts are summed over ranks: the 2-rank result (4 + 2 images) equals a
    single process over the same 6 images. A count reduced with max (4) would report a far higher PSNR."""
    _run_two_ranks(_ddp_uneven_worker, tmp_path)
    single = ReconstructionEvaluator([4], codebook_size=16)
    for rank in range(2):
        for images, recon, indices in _rank_data(rank):
            single.update(images, recon, indices=indices)
    expected = single.compute()[4]
    assert 15 < expected["psnr"] < 40  # far from the 100 dB cap, where sum and max would agree
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")[4]
        assert result.keys() == expected.keys()
        for name, value in expected.items():
            assert result[name] == pytest.approx(value, rel=1e-6), (rank, name)


# --------------------------------------------------------------------------------------------
# Codec baselines


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_codec_psnr_high_at_quality_100_and_low_at_5(codec):
    images = smooth_images(3)
    high, high_bytes = baselines.codec_psnr(images, codec, 100)
    low, low_bytes = baselines.codec_psnr(images, codec, 5)
    assert high > 36 and low < 32 and high - low > 8
    assert high_bytes > low_bytes


def test_codec_at_bytes_picks_the_best_file_within_the_budget():
    images = smooth_images(2)
    targets = [100.0, 300.0, 800.0, 1500.0]
    matches = baselines.codec_at_bytes(images, "jpeg", targets)
    for i, image in enumerate(images):
        pil = baselines.tensor_to_pil(image)
        sizes = {q: len(baselines.encode(pil, "jpeg", q)) for q in range(1, 101)}
        for target, match in zip(targets, matches):
            assert int(match.nbytes[i]) == sizes[int(match.quality[i])]
            fitting = [q for q, size in sizes.items() if size <= target]
            if fitting:  # the highest quality within the budget, up to codec wiggles in the bisection
                assert bool(match.fits[i]) and match.nbytes[i] <= target
                assert sizes[int(match.quality[i])] >= sizes[max(fitting)] - 0.02 * target
            else:  # no JPEG file is that small: quality 1, said to be over the budget
                assert not bool(match.fits[i]) and int(match.quality[i]) == 1 and match.nbytes[i] > target
    assert not matches[0].fits.any() and matches[-1].fits.all()
    assert all(torch.all(a.quality <= b.quality) for a, b in zip(matches, matches[1:]))


def test_thumbnail_codec():
    images = smooth_images(2, size=32)
    assert baselines.thumbnail_size(32, 64, 24 * 8 * 16) == (8, 16)  # aspect kept
    assert baselines.thumbnail_size(32, 32, 23) is None
    assert baselines.thumbnail_psnr(images, 32 * 32 * 24) > 45  # full size: only 8-bit rounding
    low, high = baselines.thumbnail_psnr(images, 24 * 16), baselines.thumbnail_psnr(images, 24 * 256)
    assert low < high
    flat = baselines.thumbnail_reconstruct(images, 10)
    assert torch.all(flat == 0.5)


# --------------------------------------------------------------------------------------------
# Rate-distortion and adaptive length


def test_token_counts_default_and_parsing():
    assert power_of_two_token_counts(48) == [1, 2, 4, 8, 16, 32, 48]  # vistok score's default
    assert power_of_two_token_counts(32) == [1, 2, 4, 8, 16, 32]
    assert parse_token_counts(None, 48) == power_of_two_token_counts(48)
    assert halving_token_counts(48) == [6, 12, 24, 48]  # training validation's default: K/8, K/4, K/2, K
    assert halving_token_counts(4) == [1, 2, 4]
    assert parse_token_counts("16, 4,4", 32) == [4, 16]
    for bad in ("0", "33", "4.5", "x", ""):
        with pytest.raises(VistokError):
            parse_token_counts(bad, 32)


def test_decode_prefixes_matches_separate_decodes(tiny_tokenizer):
    images = smooth_images(3, size=16)
    with torch.no_grad():
        tokens = tiny_tokenizer.encode(images)
        stacked = decode_prefixes(tiny_tokenizer, tokens, [1, 3, 8], max_batch=4)
        for k in (1, 3, 8):
            assert torch.allclose(stacked[k], tiny_tokenizer.decode(tokens[:, :k]), atol=1e-5)


def test_rate_distortion_rows_per_token_count_and_codec_quality():
    tokenizer = DCTTokenizer(image_size=32, max_tokens=16)
    batches = [smooth_images(3, seed=1), smooth_images(2, seed=2)]
    result = rate_distortion(tokenizer, batches, [1, 2, 4, 8, 16], num_examples=4)
    assert result.num_images == 5 and len(result.rows) == 4 * 5
    for method in ("tokenizer", "jpeg", "webp", "thumbnail"):
        rows = [r for r in result.rows if r["method"] == method]
        assert [r["num_tokens"] for r in rows] == [1, 2, 4, 8, 16]
        psnr = [r["psnr"] for r in rows]
        assert psnr[-1] > psnr[0]
        if method in ("jpeg", "webp"):  # bytes grow with the quality chosen to fit more bits
            by_quality = sorted(rows, key=lambda r: r["quality"])
            sizes = [r["bytes_per_image"] for r in by_quality]
            assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
            assert by_quality[-1]["quality"] > by_quality[0]["quality"]
    ours = [r for r in result.rows if r["method"] == "tokenizer"]
    assert ours[-1]["psnr"] == pytest.approx(100.0, abs=1.0)  # all coefficients: lossless up to rounding
    assert ours[0]["bits_per_image"] == 192 * 16
    assert result.examples["original"].shape == (4, 3, 32, 32) and result.examples[16].shape == (4, 3, 32, 32)


def test_baselines_never_spend_more_than_the_tokens_bytes_or_say_so(tiny_tokenizer):
    """Every baseline row within budget holds at most the tokens' bits / 8 bytes per image; rows a codec
    cannot reach (no JPEG or WebP file is 1.25 bytes) are marked within_budget < 1 and named in a note."""
    rich = rate_distortion(DCTTokenizer(image_size=32, max_tokens=16), [smooth_images(3, seed=1)], [1, 16], num_examples=0)
    poor = rate_distortion(tiny_tokenizer, [smooth_images(3, size=16, seed=1)], [1, 8], num_examples=0)  # 10 bits per token
    for result in (rich, poor):
        token_bytes = {r["num_tokens"]: r["bytes_per_image"] for r in result.rows if r["method"] == "tokenizer"}
        for row in result.rows:
            if row["method"] == "tokenizer":
                assert row["within_budget"] is None
            elif row["within_budget"] == 1:
                assert row["bytes_per_image"] <= token_bytes[row["num_tokens"]], row
            else:
                assert row["bytes_per_image"] > token_bytes[row["num_tokens"]], row
    assert all(r["within_budget"] == 1 for r in rich.rows if r["method"] != "tokenizer" and r["num_tokens"] == 16)  # 6 KB
    for codec in ("jpeg", "webp"):
        assert [r["within_budget"] for r in poor.rows if r["method"] == codec] == [0, 0]
        assert any(n.startswith(f"{codec} cannot reach the tokens' rate at k = 1, 8:") for n in poor.notes)
    assert all(r["within_budget"] == 1 for r in poor.rows if r["method"] == "thumbnail")  # reaches every rate
    table = score.summary({"token_counts": poor.token_counts, "rows": poor.rows, "notes": poor.notes}).splitlines()
    header = table[0].split()
    cells = {tuple(line.split()[:2]): line.split()[header.index("at_rate")] for line in table[1:] if line.split()[0] != "note:"}
    assert cells[("jpeg", "1")] == "NO" and cells[("thumbnail", "8")] == "yes"


def test_the_rate_distortion_plot_shows_the_target_psnr_point_and_hollow_over_budget_points(tmp_path, monkeypatch):
    from vistok.eval import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    rows = [{"method": "tokenizer", "num_tokens": k, "bytes_per_image": 2.0 * k, "psnr": 20.0 + k} for k in (1, 2)]
    rows += [{"method": "jpeg", "num_tokens": k, "bytes_per_image": 300.0, "psnr": 25.0, "within_budget": 0.0} for k in (1, 2)]
    adaptive = {"target_psnr": 21.5, "mean_tokens": 1.5, "mean_bits_per_image": 24.0, "mean_psnr": 21.7}
    plots.plot_rate_distortion(rows, tmp_path / "rd.png", adaptive=adaptive)
    labels = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert labels["target 21.5 dB: 1.5 tokens"].get_xydata().tolist() == [[3.0, 21.7]]
    assert labels["jpeg: over the tokens' bytes"].get_markerfacecolor() == "white"
    assert (tmp_path / "rd.png").is_file()


def test_rate_distortion_of_a_discrete_tokenizer_reports_usage_and_rfid(tiny_tokenizer, inception64):
    result = rate_distortion(tiny_tokenizer, [smooth_images(2, size=16), smooth_images(2, size=16, seed=3)],
                             [2, 8], inception=inception64, codecs=("webp",), target_psnr=5.0)
    ours = {r["num_tokens"]: r for r in result.rows if r["method"] == "tokenizer"}
    assert 0 < ours[2]["usage"] <= ours[8]["usage"] <= 1 and ours[8]["perplexity"] >= 1
    assert ours[8]["rfid"] is not None and ours[8]["rfid"] >= 0
    assert ours[8]["bits_per_image"] == pytest.approx(8 * math.log2(1000))
    assert result.adaptive["num_images"] == 4 and sum(result.adaptive["histogram"].values()) == 4


def test_target_psnr_picks_fewer_tokens_for_a_flat_image_than_a_noisy_one():
    tokenizer = DCTTokenizer(image_size=32, max_tokens=16)
    flat = torch.full((1, 3, 32, 32), 0.4)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, smooth_images(1), noisy])
    lengths, psnr = choose_lengths(tokenizer, images, target_psnr=30.0)
    assert lengths[0] == 1 and lengths[0] < lengths[1] < lengths[2]
    # the binary search agrees with trying every prefix
    all_k = torch.stack([psnr_per_image(tokenizer.decode(tokenizer.encode(images, k)), images) for k in range(1, 17)])
    expected = [next((k + 1 for k in range(16) if all_k[k, i] >= 30.0), 16) for i in range(3)]
    assert lengths.tolist() == expected
    assert torch.all((psnr >= 30.0) | (lengths == 16))
    summary, per_image = adaptive_lengths(tokenizer, [images[:2], images[2:]], 30.0)
    assert torch.equal(per_image, lengths) and summary["histogram"][1] == 1
    assert summary["mean_bits_per_image"] == pytest.approx(float(lengths.double().mean()) * tokenizer.token_dim * 16)


# --------------------------------------------------------------------------------------------
# vistok score


def test_score_writes_report_csv_and_plots(tiny_ckpt, image_folder, tmp_path, no_weights, capsys):
    out = tmp_path / "out"
    code = vistok_cli.main(["score", str(tiny_ckpt), str(image_folder), "--num-tokens", "2,8", "--limit", "4",
                            "--batch-size", "3", "--target-psnr", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["num_images"] == 4 and report["token_counts"] == [2, 8]
    assert [(r["method"], r["num_tokens"]) for r in report["rows"]] == [
        (m, k) for m in ("tokenizer", "jpeg", "webp", "thumbnail") for k in (2, 8)]
    assert "mean over the whole SSIM map" in report["protocol"]["ssim"] and "border" in report["protocol"]["ssim"]
    assert report["adaptive"]["num_images"] == 4
    assert any("rFID skipped" in n for n in report["notes"]) and any("LPIPS skipped" in n for n in report["notes"])
    csv_lines = (out / "rate_distortion.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,num_tokens") and len(csv_lines) == 9
    for name in ("rate_distortion.png", "reconstructions.png"):
        assert Image.open(out / name).format == "PNG"
    assert "tokenizer" in printed and "rFID skipped" in printed and "target PSNR 8 dB" in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_json_is_strict_json(tmp_path):
    """A metric that could not be computed (NaN, inf), tensors and numpy numbers all become plain JSON."""
    data = {"psnr": float("nan"), "rfid": float("inf"), "counts": torch.tensor([2, 8]), "ssim": np.float32(0.5), 3: (1, 2)}
    path = atomic_write_json(tmp_path / "report.json", data)

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"psnr": None, "rfid": None, "counts": [2, 8], "ssim": 0.5, "3": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_score_reference_and_reconstruction_folders(tmp_path, no_weights, capsys):
    reference = write_images(tmp_path / "ref", 4, size=(24, 20))
    recon = tmp_path / "rec" / "sub"
    recon.mkdir(parents=True)
    (tmp_path / "ref" / "sub").mkdir()
    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(tmp_path / "ref" / "sub" / "nested.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(recon / "nested.jpg")  # smaller: reference resized
    for path in reference.glob("*.png"):  # same names, other format: JPEG at quality 90
        Image.open(path).save(tmp_path / "rec" / f"{path.stem}.jpg", quality=90)
    out = tmp_path / "out"
    code = vistok_cli.main(["score", "--reference", str(reference), "--reconstructions", str(tmp_path / "rec"),
                            "--out", str(out), "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    row = report["rows"][0]
    assert report["num_images"] == 5 and row["psnr"] > 20 and 0 < row["ssim"] <= 1
    assert "psnr" in capsys.readouterr().out


def test_encode_decode_then_folder_scoring_skips_and_counts_an_unreadable_reference(tiny_ckpt, tmp_path, no_weights, capsys,
                                                                                   caplog):
    """encode skips a broken file, so it has no reconstruction; folder scoring skips it the same way."""
    originals = write_images(tmp_path / "originals", 3, size=(16, 16))
    (originals / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert vistok_cli.main(["encode", str(tiny_ckpt), str(originals), "--out", str(tmp_path / "t.npz")]) == 0
    assert vistok_cli.main(["decode", str(tiny_ckpt), str(tmp_path / "t.npz"), "--out", str(tmp_path / "recon")]) == 0
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    capsys.readouterr()
    caplog.clear()
    out = tmp_path / "score"
    assert vistok_cli.main(["score", "--reference", str(originals), "--reconstructions", str(tmp_path / "recon"),
                            "--out", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 3 and report["rows"][0]["num_images"] == 3
    assert report["skipped"]["count"] == 1 and report["skipped"]["files"][0]["name"] == "broken"
    assert "skipped 1 unreadable reference image(s)" in captured.out
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"skipped {originals / 'broken.png'}"]

    # A readable reference without a reconstruction is still an error, not a skip.
    (tmp_path / "recon" / "img2.png").unlink()
    assert vistok_cli.main(["score", "--reference", str(originals), "--reconstructions", str(tmp_path / "recon"),
                            "--out", str(out)]) == 2
    assert "1 reference image(s) have no reconstruction (img2)" in capsys.readouterr().err


def test_the_default_score_folder_is_unique_per_run():
    from vistok.eval.cli import default_name

    assert default_name(Path("runs/a/checkpoints/last.ckpt")) == "a-last"
    assert default_name(Path("runs/b/checkpoints/last.ckpt")) == "b-last"
    assert default_name(Path("runs/a/checkpoints/best-0000080.ckpt")) == "a-best-0000080"
    assert default_name(Path("runs/a/export")) == "a-export"


def _bad_inputs(tmp: Path, ckpt: Path, images: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    odd = write_images(tmp / "odd", 2, size=(20, 24))
    ref = write_images(tmp / "ref", 5)
    rec = write_images(tmp / "rec", 3)
    (rec / "img2.png").rename(rec / "other.png")
    t, d = str(ckpt), str(images)
    return {
        "missing tokenizer": (["score", str(tmp / "nope.ckpt"), d], "does not exist"),
        "missing data": (["score", t, str(tmp / "nope")], "does not exist"),
        "folder without images": (["score", t, str(empty)], "holds no images"),
        "too many tokens": (["score", t, d, "--num-tokens", "4,9"], "outside 1..8"),
        "zero tokens": (["score", t, d, "--num-tokens", "0"], "outside 1..8"),
        "non-integer tokens": (["score", t, d, "--num-tokens", "4.5"], "whole numbers"),
        "wrong size without resizing": (["score", t, str(odd), "--no-resize"], "is 24x20 but the tokenizer takes 16x16"),
        "unmatched names": (["score", "--reference", str(ref), "--reconstructions", str(rec)], "img2, img3, img4"),
        "missing inception weights": (["score", t, d, "--inception-weights", str(tmp / "w.pth")], "do not exist"),
        "bad batch size": (["score", t, d, "--batch-size", "0"], "positive whole number"),
        "one folder only": (["score", "--reference", str(ref)], "go together"),
        "no arguments": (["score"], "pass a TOKENIZER"),
        "unknown device": (["score", t, d, "--device", "nope"], "--device 'nope' is not a device; use auto, cpu, cuda or cuda:N."),
    }


def test_every_bad_input_gets_one_sentence_and_status_2(tmp_path, tiny_ckpt, image_folder, no_weights, capsys):
    cases = _bad_inputs(tmp_path, tiny_ckpt, image_folder)
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (["score", str(tiny_ckpt), str(image_folder), "--device", "cuda"], "no CUDA device")
    for label, (argv, expected) in cases.items():
        code = vistok_cli.main(argv + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, label
        assert len(err) == 1 and err[0].startswith("vistok score: error: "), (label, err)
        assert expected in err[0], (label, err[0])
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path, tiny_ckpt, image_folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "vistok", "score", str(tiny_ckpt), str(image_folder),
                             "--num-tokens", "64"], capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "vistok score: error: token count 64 is outside 1..8, the range this tokenizer decodes; choose counts from 1 to 8."]


def test_png_roundtrip_helpers_are_exact():
    images = metrics.round_8bit(smooth_images(1))[0]
    buffer = io.BytesIO()
    baselines.tensor_to_pil(images).save(buffer, format="PNG")
    assert torch.equal(baselines.decode(buffer.getvalue()), images)
