"""Model core: TiTok / conv encoders and decoders, tail-token dropout, ImageTokenizer, presets.

Tiny models (a few thousand to ~100k parameters) on 16-32 px images, CPU, seeded.
"""
from __future__ import annotations

import json

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from timm.layers.attention import Attention

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.model import PRESETS, ImageTokenizer, build_tokenizer
from vistok.tokenizers.token_dropout import TailTokenDropout, pad_with_mask_token
from vistok.tokenizers.transformer import attention_bias, make_blocks, run_blocks

QUANTIZERS = {
    "fsq": {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [5, 5, 5]},
    "vq": {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 4, "codebook_size": 32},
    "lfq": {"_target_": "vistok.tokenizers.quantizers.LFQ", "dim": 4},
    "softvq": {"_target_": "vistok.tokenizers.quantizers.SoftVQ", "dim": 4, "codebook_size": 16},
}
# 1D: 16 px, 4x4 patches of 4 px, K = 8 tokens. 2D: 16 px, downsample 4, K = 4x4 = 16 tokens.
TINY = {
    "titok": dict(arch="titok", image_size=16, patch_size=4, num_tokens=8, width=32, depth=1, heads=2),
    "conv": dict(arch="conv", image_size=16, channels=8, channel_mult=[1, 2, 2], num_res_blocks=1),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(arch: str, quantizer: str = "fsq", **kwargs) -> ImageTokenizer:
    return build_tokenizer(**{**TINY[arch], "quantizer": QUANTIZERS[quantizer], **kwargs})


def images_for(tok: ImageTokenizer, batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, tok.image_size, tok.image_size)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_encode_decode_round_trip_shapes(arch: str, quantizer: str) -> None:
    tok = tiny(arch, quantizer).eval()
    x = images_for(tok)
    expected_k = 8 if arch == "titok" else 16
    assert tok.max_tokens == expected_k and tok.arch == arch and tok.image_size == x.shape[-1]
    with torch.no_grad():
        tokens = tok.encode(x)
        if quantizer == "softvq":
            assert not tok.is_discrete and tok.codebook_size is None
            assert tokens.dtype == torch.float32 and tokens.shape == (3, expected_k, tok.token_dim)
        else:
            assert tok.is_discrete and tok.codebook_size >= 2
            assert tokens.dtype == torch.long and tokens.shape == (3, expected_k)
            assert 0 <= int(tokens.min()) and int(tokens.max()) < tok.codebook_size
        assert tok.encode(x, num_tokens=3).shape[:2] == (3, 3)
        torch.testing.assert_close(tok.encode(x, num_tokens=3), tokens[:, :3])

        images = tok.decode(tokens)
        assert images.shape == x.shape and images.dtype == torch.float32
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0

        out = tok(x)
        assert out.reconstruction.shape == x.shape
        assert out.lengths.tolist() == [expected_k] * 3
        assert out.quantizer.quantized.shape == (3, expected_k, tok.token_dim)
        # decode(encode(x)) is forward's reconstruction, clamped
        torch.testing.assert_close(images, out.reconstruction.clamp(0, 1), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- prefixes


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_decoding_k_tokens_ignores_tokens_beyond_k(arch: str) -> None:
    tok = tiny(arch).eval()
    K = tok.max_tokens
    with torch.no_grad():
        codes = tok.quantizer.indices_to_codes(tok.encode(images_for(tok)))
        for k in (1, K // 2, K - 1):
            changed = codes.clone()
            changed[:, k:] = torch.randn_like(changed[:, k:]) * 100
            lengths = torch.full((3,), k)
            reference = tok.decode_codes(codes[:, :k])
            torch.testing.assert_close(tok.decode_codes(codes, lengths), reference, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(tok.decode_codes(changed, lengths), reference, atol=1e-4, rtol=1e-4)
            # and the tail does matter when it is not hidden
            assert (tok.decode_codes(changed) - tok.decode_codes(codes)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_mixed_lengths_in_one_batch_match_per_sample_prefixes(arch: str) -> None:
    tok = tiny(arch).eval()
    K = tok.max_tokens
    x = images_for(tok, batch=4)
    lengths = torch.tensor([1, 3, K, K // 2])
    with torch.no_grad():
        indices = tok.encode(x)
        scrambled = indices.clone()
        for b, n in enumerate(lengths.tolist()):
            scrambled[b, n:] = torch.randint(tok.codebook_size, (K - n,))
        mixed = tok.decode(scrambled, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = tok.decode(indices[b : b + 1, :n])
            torch.testing.assert_close(mixed[b : b + 1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_hidden_tokens_pass_neither_values_nor_gradients(arch: str) -> None:
    tok = tiny(arch)
    K = tok.max_tokens
    codes = torch.randn(2, K, tok.token_dim, requires_grad=True)
    poisoned = torch.where(torch.arange(K)[None, :, None] >= 2, torch.full_like(codes, float("nan")), codes)
    recon = tok.decode_codes(poisoned, lengths=torch.tensor([2, 1]))
    assert torch.isfinite(recon).all()
    recon.square().mean().backward()
    assert torch.isfinite(codes.grad).all() and codes.grad[:, 2:].abs().max() == 0
    assert codes.grad[1, 1:].abs().max() == 0 and codes.grad[0, :2].abs().max() > 0
    for name, p in tok.decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_pad_with_mask_token_selects_not_multiplies() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [float("inf"), 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    mask = torch.tensor([-1.0, -2.0])
    out = pad_with_mask_token(tokens, mask, max_tokens=3, lengths=torch.tensor([1, 2]))
    expected = torch.tensor([[[1.0, 2.0], [-1.0, -2.0], [-1.0, -2.0]], [[5.0, 6.0], [7.0, 8.0], [-1.0, -2.0]]])
    torch.testing.assert_close(out, expected)
    with pytest.raises(VistokError, match="1 to 3"):
        pad_with_mask_token(torch.zeros(1, 4, 2), mask, max_tokens=3)


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_decode_accepts_every_prefix_length(arch: str) -> None:
    tok = tiny(arch).eval()
    x = images_for(tok, batch=2)
    with torch.no_grad():
        indices = tok.encode(x)
        previous = None
        for k in range(1, tok.max_tokens + 1):
            images = tok.decode(indices[:, :k])
            assert images.shape == x.shape and torch.isfinite(images).all()
            torch.testing.assert_close(images, tok.decode(indices, lengths=torch.full((2,), k)), atol=1e-4, rtol=1e-4)
            if previous is not None:
                assert not torch.equal(images, previous)  # each new token changes the picture
            previous = images


# ---------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("quantizer", ["fsq", "softvq"])
@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_reconstruction_loss_reaches_every_encoder_parameter(arch: str, quantizer: str) -> None:
    tok = tiny(arch, quantizer).train()
    x = images_for(tok)
    out = tok(x)
    (F.mse_loss(out.reconstruction, x) + out.quantizer.loss).backward()
    for name, p in tok.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches encoder.{name}"


def test_a_few_training_steps_with_token_dropout_lower_the_reconstruction_error() -> None:
    tok = tiny("titok", token_dropout={"p": 1.0})
    # smooth images (bilinear 2x2 colour grids): learnable from 8 tokens, unlike pure noise
    x = F.interpolate(torch.rand(8, 3, 2, 2), size=(16, 16), mode="bilinear", align_corners=True)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)

    def eval_error() -> float:
        with torch.no_grad():
            return F.mse_loss(tok.eval()(x).reconstruction, x).item()

    before = eval_error()
    tok.train()
    for _ in range(60):
        out = tok(x)
        loss = F.mse_loss(out.reconstruction, x) + out.quantizer.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_error() < 0.6 * before


def test_forward_uses_dropout_lengths_in_training_and_all_tokens_in_eval() -> None:
    tok = tiny("titok", token_dropout={"p": 1.0, "min_tokens": 2})
    K = tok.max_tokens
    x = images_for(tok, batch=32)
    with torch.no_grad():
        lengths = tok.train()(x).lengths
        assert lengths.dtype == torch.long and lengths.shape == (32,)
        assert 2 <= int(lengths.min()) and int(lengths.max()) <= K and len(set(lengths.tolist())) > 3
        out = tok(x)  # the reconstruction is the one for the sampled lengths
        tok.eval()
        torch.testing.assert_close(out.reconstruction, tok.decode_codes(out.quantizer.quantized, out.lengths),
                                   atol=1e-4, rtol=1e-4)
        assert tok(x).lengths.tolist() == [K] * 32
        assert tok(x, num_tokens=3).lengths.tolist() == [3] * 32
        per_sample = torch.randint(1, K + 1, (32,))
        assert torch.equal(tok(x, num_tokens=per_sample).lengths, per_sample)
        # an explicit num_tokens wins over the dropout in training too
        assert tok.train()(x, num_tokens=K).lengths.tolist() == [K] * 32
        assert tiny("titok").train()(x).lengths.tolist() == [K] * 32  # no dropout configured


# ---------------------------------------------------------------- token dropout


@pytest.mark.parametrize("K", [1, 7, 12, 16])
@pytest.mark.parametrize("min_tokens", [1, 3])
def test_tail_token_dropout_ranges(K: int, min_tokens: int) -> None:
    if min_tokens > K:
        with pytest.raises(VistokError, match="min_tokens"):
            TailTokenDropout(min_tokens=min_tokens).sample(4, K)
        return
    powers = {1 << e for e in range(8)}
    for distribution in ("uniform", "pow2", "uniform_pow2"):
        dropout = TailTokenDropout(p=1.0, min_tokens=min_tokens, distribution=distribution)
        lengths = dropout.sample(4000, K)
        assert lengths.dtype == torch.long and lengths.shape == (4000,)
        values = set(lengths.tolist())
        assert min(values) >= min_tokens and max(values) <= K
        assert values == set(dropout.candidate_lengths(K))
        if distribution == "uniform":
            assert values == set(range(min_tokens, K + 1))
        else:
            assert values <= powers | {K} and K in values


def test_uniform_pow2_rounds_up_and_pow2_is_uniform_over_powers() -> None:
    lengths = TailTokenDropout(distribution="uniform_pow2").sample(40000, 16)
    freq = {k: (lengths == k).float().mean().item() for k in (1, 2, 4, 8, 16)}
    # k ~ U{1..16} rounded up: 1 -> 1, 2 -> 2, 3..4 -> 4, 5..8 -> 8, 9..16 -> 16
    for k, expected in {1: 1 / 16, 2: 1 / 16, 4: 2 / 16, 8: 4 / 16, 16: 8 / 16}.items():
        assert abs(freq[k] - expected) < 0.015, (k, freq[k])
    lengths = TailTokenDropout(distribution="pow2").sample(40000, 12)  # 1, 2, 4, 8 and K = 12
    for k in (1, 2, 4, 8, 12):
        assert abs((lengths == k).float().mean().item() - 0.2) < 0.015


def test_tail_token_dropout_probability_and_determinism() -> None:
    assert TailTokenDropout(p=0.0).sample(100, 9).tolist() == [9] * 100
    kept_all = (TailTokenDropout(p=0.5, min_tokens=1).sample(20000, 9) == 9).float().mean().item()
    assert abs(kept_all - (0.5 + 0.5 / 9)) < 0.02
    a = TailTokenDropout().sample(50, 9, generator=torch.Generator().manual_seed(3))
    b = TailTokenDropout().sample(50, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_tail_token_dropout_runs_between_its_steps_and_the_tokenizer_passes_the_training_step() -> None:
    dropout = TailTokenDropout(p=1.0, start_step=100, stop_step=200)
    for step in (0, 99, 200, 5000):  # outside [start_step, stop_step): every sample keeps all 9
        assert dropout.sample(64, 9, step=step).tolist() == [9] * 64
    for step in (100, 199, None):  # inside, or no step (outside a training loop)
        assert (dropout.sample(64, 9, step=step) < 9).any()
    tok = tiny("titok", token_dropout={"p": 1.0, "start_step": 100}).train()
    assert tok.config["token_dropout"]["start_step"] == 100 and build_tokenizer(**tok.config).config == tok.config
    assert "start_step" not in tiny("titok", token_dropout={"p": 1.0}).config["token_dropout"]  # fingerprints as before
    x = images_for(tok, batch=32)
    assert tok(x, step=0).lengths.tolist() == [tok.max_tokens] * 32
    assert (tok(x, step=100).lengths < tok.max_tokens).any()
    for bad in (-1, 1.5, True):
        with pytest.raises(VistokError, match="start_step must be an integer >= 0"):
            TailTokenDropout(start_step=bad)
    for bad in (100, 50, 150.0):
        with pytest.raises(VistokError, match=r"stop_step must be null or an integer above start_step \(100\)"):
            TailTokenDropout(start_step=100, stop_step=bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p": 1.5}, "probability"),
        ({"p": -0.1}, "probability"),
        ({"min_tokens": 0}, "min_tokens"),
        ({"min_tokens": 2.5}, "min_tokens"),
        ({"distribution": "gauss"}, "uniform, pow2, uniform_pow2"),
    ],
)
def test_tail_token_dropout_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(VistokError, match=message):
        TailTokenDropout(**kwargs)


# ---------------------------------------------------------------- config, presets, attention


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_config_rebuilds_identical_architecture(arch: str) -> None:
    extra = {"token_dropout": {"p": 0.9, "distribution": "pow2"}}
    if arch == "titok":
        extra.update(decoder_depth=2, mlp_ratio=2.0)
    else:
        extra.update(mid_attention=True)
    tok = tiny(arch, "vq", **extra).eval()
    config = json.loads(json.dumps(tok.config))  # plain JSON round trip
    assert config == tok.config
    rebuilt = build_tokenizer(**config).eval()
    assert rebuilt.config == tok.config
    shapes = {k: v.shape for k, v in tok.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(tok.state_dict())
    x = images_for(tok, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).reconstruction, tok(x).reconstruction)
    assert rebuilt.token_dropout.get_config() == {"p": 0.9, "min_tokens": 1, "distribution": "pow2"}


def test_overrides_replace_preset_values() -> None:
    tok = build_tokenizer("titok", "tiny", image_size=16, quantizer=QUANTIZERS["fsq"], width=48, heads=3, depth=1)
    assert tok.config["width"] == tok.config["decoder_width"] == 48 and tok.config["depth"] == 1
    assert len(tok.encoder.blocks) == 1 and tok.encoder.proj.in_features == 48
    assert tok.encoder.proj.out_features == tok.token_dim == 3  # encoder output = quantizer dim
    assert tok.max_tokens == PRESETS["titok"]["tiny"]["num_tokens"] and tok.patch_size == 4
    conv = build_tokenizer("conv", "tiny", image_size=32, channels=8)
    assert conv.config["channels"] == 8 and conv.downsample == 8 and conv.max_tokens == 16


def test_preset_sizes_match_the_reference_models() -> None:
    # built on the meta device: shapes only, no memory or init cost
    with torch.device("meta"):
        counts = {
            (arch, name): sum(p.numel() for p in build_tokenizer(arch, name, image_size=256).encoder.parameters())
            for arch in PRESETS
            for name in PRESETS[arch]
        }
    # TiTok encoders are ViT-S/B/L-sized transformers (ViT-B/16: 86M, ViT-L/16: 304M)
    assert 20e6 < counts["titok", "small"] < 30e6
    assert 80e6 < counts["titok", "base"] < 92e6
    assert 290e6 < counts["titok", "large"] < 315e6
    assert counts["titok", "tiny"] < 1e6 and counts["conv", "tiny"] < 1e6
    assert 20e6 < counts["conv", "f8"] < 32e6 and 20e6 < counts["conv", "f16"] < 32e6
    with torch.device("meta"):
        assert build_tokenizer("conv", "f16", image_size=256).max_tokens == 256
        assert build_tokenizer("conv", "f8", image_size=256).max_tokens == 1024


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_attention_runs_through_scaled_dot_product_attention(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # even when timm's global switch says otherwise, our blocks use the fused path
    timm.layers.set_fused_attn(False)
    try:
        tok = tiny(arch, decoder_depth=2) if arch == "titok" else tiny(arch, mid_attention=True)
    finally:
        timm.layers.set_fused_attn(True)
    attention = [m for m in tok.modules() if isinstance(m, Attention)]
    assert all(m.fused_attn for m in attention)
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        tok.eval()(images_for(tok, batch=2))
    expected = 1 + 2 if arch == "titok" else 2  # encoder + decoder blocks; conv: one mid block each
    assert len(attention) == (expected if arch == "titok" else 0)
    assert len(calls) == expected
    if arch == "titok":  # encoder: 16 patches + 8 latents; decoder: 16 queries + 8 slots; 2 heads
        # each side's last block asks only for the rows it outputs: the latents, the patch queries
        assert calls == [(2, 2, 8, 16), (2, 2, 24, 16), (2, 2, 16, 16)]


@pytest.mark.parametrize("bias", [False, True])
def test_the_last_block_computing_only_the_kept_rows_gives_the_full_blocks_rows(bias: bool) -> None:
    blocks = make_blocks(32, 2, 2, 4.0)
    masks = attention_bias(2, 2, 24, 1.0) if bias else None
    x = torch.randn(3, 24, 32)
    with torch.no_grad():
        full = blocks(x) if masks is None else blocks[1](blocks[0](x, attn_mask=masks[0]), attn_mask=masks[1])
        for rows in (slice(16), slice(16, None), slice(3, 9)):
            assert torch.allclose(run_blocks(blocks, x, masks, rows=rows), full[:, rows], atol=1e-6)
        assert torch.allclose(run_blocks(blocks, x, masks), full, atol=1e-6)
    # and the gradients reach the same parameters as the full blocks' do (every weight of the last block)
    run_blocks(blocks, x, masks, rows=slice(16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.parameters())


# ---------------------------------------------------------------- decoder heads


def head_channels(head: str) -> dict:
    """A few channels for the conv heads; the linear head has none (setting them is an error)."""
    return {} if head == "linear" else {"decoder_head_channels": 4}


@pytest.mark.parametrize("head", ["linear", "conv", "upsample"])
def test_every_decoder_head_decodes_every_prefix_and_trains_the_encoder(head: str) -> None:
    tok = tiny("titok", decoder_head=head, **head_channels(head))
    assert tok.config.get("decoder_head", "linear") == head and build_tokenizer(**tok.config).config == tok.config
    assert ("decoder_head" in tok.config) == (head != "linear")  # linear-head configs (and fingerprints) as before
    x = images_for(tok)
    with torch.no_grad():
        for k in range(1, tok.max_tokens + 1):
            assert tok.eval().decode(tok.encode(x)[:, :k]).shape == x.shape
    out = tok.train()(x)
    F.mse_loss(out.reconstruction, x).backward()
    assert tok.encoder.proj.weight.grad.abs().sum() > 0
    assert tok.decoder.last_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("head", ["linear", "conv", "upsample"])
def test_conv_heads_cross_patch_borders_and_keep_the_mean_colour(head: str) -> None:
    tok = tiny("titok", decoder_head=head, **head_channels(head))
    for p in tok.decoder.refine.parameters():  # leave the zero-initialised residual branch no longer zero
        torch.nn.init.normal_(p, std=0.3)
    d = tok.decoder
    features = torch.randn(1, d.grid * d.grid, 32)
    with torch.no_grad():
        base = d.to_pixels(features)
        # one patch query changes: only its own patch may change under the linear head
        poked = features.clone()
        poked[0, 0] += 1.0
        changed = (d.to_pixels(poked) - base).abs().amax(dim=1)[0] > 1e-6
        p = d.patch_size
        assert changed[:p, :p].any()
        assert changed[p:, :].any() == (head != "linear")
        # every query shifted alike: the image must change too (a GroupNorm in the head would
        # normalise such a shift away, and the tokens could not set an image's mean colour)
        shifted = d.to_pixels(features + torch.randn(1, 1, 32))
        assert (shifted - base).abs().mean() > 1e-3


def test_encoder_pos_std_sets_the_patch_positions_scale_and_enters_the_config_only_when_not_the_default() -> None:
    default = tiny("titok")
    assert "encoder_pos_std" not in default.config  # existing configs (and fingerprints) unchanged
    assert 0.01 < float(default.encoder.pos_embed.std()) < 0.03
    wide = tiny("titok", encoder_pos_std=0.5)
    assert wide.config["encoder_pos_std"] == 0.5 and build_tokenizer(**wide.config).config == wide.config
    assert 0.4 < float(wide.encoder.pos_embed.std()) < 0.6
    assert float(wide.encoder.latent_tokens.std()) < 0.03  # only the patch positions change


def test_decoder_patch_size_gives_the_decoder_its_own_grid_of_queries() -> None:
    same = tiny("titok", decoder_patch_size=TINY["titok"]["patch_size"])
    assert "decoder_patch_size" not in same.config and "decoder_patch_size" not in tiny("titok").config
    tok = tiny("titok", decoder_patch_size=2, decoder_head="conv", decoder_head_channels=4, attn_bias_std=1.0)
    assert tok.config["decoder_patch_size"] == 2 and build_tokenizer(**tok.config).config == tok.config
    assert tok.patch_size == tok.encoder.patch_size != tok.decoder.patch_size == 2  # the encoder keeps its patches
    queries = (tok.image_size // 2) ** 2
    assert tok.decoder.pos_embed.shape[1] == queries
    assert tok.decoder.attn_bias.shape[-1] == queries + tok.max_tokens != tok.encoder.attn_bias.shape[-1]
    x = images_for(tok)
    with torch.no_grad():
        for k in (1, tok.max_tokens):
            assert tok.eval().decode(tok.encode(x)[:, :k]).shape == x.shape
    F.mse_loss(tok.train()(x).reconstruction, x).backward()
    assert tok.encoder.proj.weight.grad.abs().sum() > 0 and tok.decoder.pos_embed.grad.abs().sum() > 0


def footprints(tok: ImageTokenizer) -> torch.Tensor:
    """(patches, K): how much each latent token moves when one patch of the images is redrawn, per token normalised."""
    images = torch.rand(4, 3, tok.image_size, tok.image_size, generator=torch.Generator().manual_seed(1))
    p, grid = tok.patch_size, tok.image_size // tok.patch_size
    with torch.no_grad():
        base = tok.encoder(images * 2 - 1)
        moved = []
        for index in range(grid * grid):
            row, col = divmod(index, grid)
            redrawn = images.clone()
            redrawn[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p] = 1 - redrawn[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
            moved.append((tok.encoder(redrawn * 2 - 1) - base).norm(dim=-1).mean(0))
    sensitivity = torch.stack(moved)
    return sensitivity / sensitivity.sum(0, keepdim=True)


def test_attn_bias_gives_each_latent_token_its_own_footprint_from_the_start() -> None:
    """At ViT's initialisation every latent token pools about the same average of all patches (the
    flat-colour plateau of docs/rd32.md); a random attention bias makes their footprints differ."""
    plain = tiny("titok")
    assert "attn_bias_std" not in plain.config and plain.encoder.attn_bias is None  # old configs unchanged
    torch.manual_seed(0)
    biased = tiny("titok", attn_bias_std=1.0)
    assert biased.config["attn_bias_std"] == 1.0 and build_tokenizer(**biased.config).config == biased.config
    sequence = (biased.image_size // biased.patch_size) ** 2 + biased.max_tokens
    assert biased.encoder.attn_bias.shape == biased.decoder.attn_bias.shape == (1, 2, sequence, sequence)
    assert 0.9 < float(biased.encoder.attn_bias.std()) < 1.1
    spread_plain, spread_biased = footprints(plain).std(dim=1).mean(), footprints(biased).std(dim=1).mean()
    assert spread_biased > 3 * spread_plain
    # the bias is trained: reconstruction gradients reach both
    biased(images_for(biased)).reconstruction.mean().backward()
    assert biased.encoder.attn_bias.grad.abs().sum() > 0 and biased.decoder.attn_bias.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="titok", image_size=30, patch_size=4), "image_size 30 is not a multiple of patch_size 4"),
        (dict(arch="conv", image_size=20), "image_size 20 is not a multiple of the conv downsampling factor 8"),
        (dict(arch="titok", num_tokens=0), "num_tokens must be an integer >= 1"),
        (dict(arch="conv", num_tokens=5), "num_tokens 5 does not match"),
        (dict(arch="conv", patch_size=4), "patch_size 4 does not apply"),
        (dict(arch="titok", preset="huge"), "unknown titok preset 'huge'"),
        (dict(arch="vit"), "unknown arch 'vit'"),
        (dict(arch="titok", channels=8), "unknown titok setting"),
        (dict(arch="titok", width=30, heads=4), "width 30 is not divisible by heads 4"),
        (dict(arch="titok", num_tokens=4, token_dropout={"min_tokens": 5}), "min_tokens 5 exceeds"),
        (dict(arch="titok", token_dropout={"rate": 0.5}), "unknown token_dropout setting"),
        (dict(arch="titok", decoder_head="deconv"), "unknown decoder_head 'deconv'"),
        (dict(arch="titok", encoder_pos_std=2.0), "encoder_pos_std must be a number in"),
        (dict(arch="titok", attn_bias_std=-1.0), "attn_bias_std must be a number in"),
        (dict(arch="titok_original", attn_bias_std=1.0), "unknown titok_original setting"),
        (dict(arch="titok", image_size=24, patch_size=6, decoder_head="upsample"), "power-of-two patch_size"),
        # 0 is a bad value, not "unset": it must not fall back to the default
        (dict(arch="titok", decoder_head="conv", decoder_head_channels=0), "decoder_head_channels must be an integer >= 1"),
        (dict(arch="titok", decoder_head_channels=8), "decoder_head_channels sets the conv head, but decoder_head is linear"),
        (dict(arch="titok", decoder_width=0), "decoder_width must be an integer >= 1"),
        (dict(arch="titok", decoder_heads=0), "decoder_heads must be an integer >= 1"),
        (dict(arch="titok", encoder_pos_std=0), "encoder_pos_std must be a number in"),
        (dict(arch="titok", decoder_head=""), "unknown decoder_head ''"),
        (dict(arch="titok", decoder_patch_size=0), "decoder_patch_size must be an integer >= 1"),
        (dict(arch="titok", image_size=32, decoder_patch_size=3), "image_size 32 is not a multiple of decoder_patch_size 3"),
        (dict(arch="titok_original", decoder_patch_size=2), "unknown titok_original setting"),
    ],
)
def test_build_tokenizer_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(VistokError, match=message):
        build_tokenizer(**{"quantizer": QUANTIZERS["fsq"], **kwargs})


@pytest.mark.parametrize("arch", ["titok", "conv"])
def test_bad_inputs_raise_clear_errors(arch: str) -> None:
    tok = tiny(arch).eval()
    K, size = tok.max_tokens, tok.image_size
    with torch.no_grad():
        indices = tok.encode(images_for(tok, batch=2))
        with pytest.raises(VistokError, match=f"1 to {K} tokens"):
            tok.decode(torch.cat([indices, indices[:, :1]], dim=1))
        with pytest.raises(VistokError, match=f"1 to {K} tokens"):
            tok.decode(indices[:, :0])
        with pytest.raises(VistokError, match=f"1 to {K} tokens"):
            tok.encode(images_for(tok), num_tokens=K + 1)
        with pytest.raises(VistokError, match=f"{size}x{size}"):
            tok.encode(torch.rand(1, 3, size + 8, size + 8))
        with pytest.raises(VistokError, match=f"{size}x{size}"):
            tok(torch.rand(3, size, size))
        with pytest.raises(VistokError, match="lengths must lie in"):
            tok.decode(indices, lengths=torch.tensor([0, 1]))
        with pytest.raises(VistokError, match=r"lengths must be a \(B,\)"):
            tok.decode(indices, lengths=torch.tensor([1, 1, 1]))
        with pytest.raises(VistokError, match="token indices must lie in"):
            tok.decode(indices + tok.codebook_size)
        soft = tiny(arch, "softvq")
        with pytest.raises(VistokError, match="soft codes"):
            soft.decode(indices)
