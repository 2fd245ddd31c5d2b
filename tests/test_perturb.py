"""Token perturbation (issue 14, part 2): replacement codes per quantizer, `vistok score --perturb`,
and the training option next to tail-token dropout."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from vistok.cli import main as vistok_main
from vistok.eval.rate_distortion import rate_distortion
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.model import build_tokenizer
from vistok.tokenizers.quantizers import FSQ, LFQ, DiagonalGaussian, SoftVQ, VectorQuantizer
from vistok.tokenizers.token_perturb import TokenPerturbation, perturbed_variants, replacement_indices
from vistok.tokenizers.training.run import build_module, run_training
from vistok.tokenizers.training.settings import CONFIG_DIR

from conftest import save_checkpoint, save_pngs, smooth_images

VQ = {"_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 4, "codebook_size": 32}


def fsq_digits(quantizer: FSQ, indices: torch.Tensor) -> torch.Tensor:
    return torch.div(indices.unsqueeze(-1), quantizer._basis, rounding_mode="floor") % quantizer._levels


# --------------------------------------------------------------------------------------------
# Replacement codes


def test_fsq_nearest_is_one_level_step_on_one_channel_and_stays_on_the_grid():
    fsq = FSQ(levels=[2, 3, 5])
    indices = torch.arange(fsq.codebook_size).repeat(20)  # every code, the grid's edges included
    moved = fsq.neighbours(indices, generator=torch.Generator().manual_seed(1))
    assert moved.dtype == torch.long and int(moved.min()) >= 0 and int(moved.max()) < fsq.codebook_size
    step = fsq_digits(fsq, moved) - fsq_digits(fsq, indices)
    assert torch.equal(step.abs().sum(-1), torch.ones_like(indices))  # one channel, one level
    # every direction a code has is drawn: the corner code 0 moves up on each of its 3 channels
    assert set(moved[indices == 0].tolist()) == {1, 2, 6}
    # and the code vectors differ by one grid step (2 / (L - 1) on [-1, 1]) on one channel
    gap = (fsq.indices_to_codes(moved[None]) - fsq.indices_to_codes(indices[None])).abs().sum(-1)
    steps = 1 / torch.tensor([1.0, 1.0, 2.0])
    assert all(any(torch.isclose(g, s) for s in steps) for g in gap.flatten()[:50])


def test_lfq_nearest_flips_exactly_one_bit():
    lfq = LFQ(dim=10, entropy_weight=0.0)
    indices = torch.randint(0, lfq.codebook_size, (4, 64))
    moved = lfq.neighbours(indices, generator=torch.Generator().manual_seed(2))
    flipped = indices ^ moved
    assert int(moved.min()) >= 0 and int(moved.max()) < lfq.codebook_size
    assert torch.equal(flipped & (flipped - 1), torch.zeros_like(flipped)) and bool((flipped > 0).all())  # a power of two
    assert len(set(flipped.flatten().tolist())) == 10  # every bit gets flipped somewhere


@pytest.mark.parametrize("use_cosine", [False, True])
def test_vq_nearest_is_among_the_k_nearest_codes(use_cosine):
    vq = VectorQuantizer(dim=4, codebook_size=32, use_cosine=use_cosine)
    indices = torch.randint(0, 32, (3, 40))
    moved = vq.neighbours(indices, k=3, generator=torch.Generator().manual_seed(3))
    codes = vq.codes()
    distances = torch.cdist(codes, codes)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(3, largest=False).indices  # (32, 3) by brute force
    for code, new in zip(indices.flatten().tolist(), moved.flatten().tolist()):
        assert new in nearest[code].tolist() and new != code
    assert set(moved.flatten().tolist()) - set(nearest[indices.flatten()].flatten().tolist()) == set()
    assert len(set(zip(indices.flatten().tolist(), moved.flatten().tolist()))) > 40  # more than one neighbour is drawn


@pytest.mark.parametrize("quantizer", [FSQ(levels=[3, 3]), LFQ(dim=4, entropy_weight=0.0), VectorQuantizer(dim=4, codebook_size=16)])
def test_random_replacements_are_other_valid_codes_spread_over_the_codebook(quantizer):
    indices = torch.zeros(8, 64, dtype=torch.long)
    moved = replacement_indices(quantizer, indices, "random", generator=torch.Generator().manual_seed(4))
    assert bool((moved != indices).all()) and int(moved.max()) < quantizer.codebook_size
    assert set(moved.flatten().tolist()) == set(range(1, quantizer.codebook_size))  # uniform over the others


def test_soft_tokens_and_misplaced_k_are_refused_in_one_sentence():
    for soft in (SoftVQ(dim=4, codebook_size=8), DiagonalGaussian(dim=4)):
        with pytest.raises(VistokError, match="continuous") as refused:
            replacement_indices(soft, torch.zeros(1, 4, dtype=torch.long), "random")
        assert "\n" not in str(refused.value)
    with pytest.raises(VistokError, match="k=3 does not apply"):
        FSQ(levels=[3, 3]).neighbours(torch.zeros(2, dtype=torch.long), k=3)
    with pytest.raises(VistokError, match="k=3 does not apply"):
        LFQ(dim=4).neighbours(torch.zeros(2, dtype=torch.long), k=3)
    with pytest.raises(VistokError, match="from 1 to 15"):
        VectorQuantizer(dim=4, codebook_size=16).neighbours(torch.zeros(2, dtype=torch.long), k=16)


def test_variants_replace_round_rate_times_n_nested_and_seeded():
    fsq = FSQ(levels=[8, 5, 5, 5])
    tokens = torch.randint(0, fsq.codebook_size, (5, 20))
    draw = lambda: perturbed_variants(fsq, tokens, [0.0, 0.1, 0.5, 1.0], "nearest", generator=torch.Generator().manual_seed(7))
    variants = draw()
    assert [(v != tokens).sum(1).tolist() for v in variants] == [[0] * 5, [2] * 5, [10] * 5, [20] * 5]
    low, high = (variants[1] != tokens), (variants[2] != tokens)
    assert bool((high | ~low).all()) and torch.equal(variants[2][low], variants[1][low])  # nested, same codes
    assert all(torch.equal(a, b) for a, b in zip(variants, draw()))  # the seed fixes the draw
    other = perturbed_variants(fsq, tokens, [0.5], "nearest", generator=torch.Generator().manual_seed(8))[0]
    assert not torch.equal(other, variants[2])


# --------------------------------------------------------------------------------------------
# vistok score --perturb


@pytest.fixture(scope="module")
def trained(fitted_tokenizer):
    return fitted_tokenizer


@pytest.mark.parametrize("kind", ["random", "nearest"])
def test_quality_falls_as_the_rate_rises_and_rate_zero_is_the_clean_score(trained, kind):
    tokenizer, images = trained
    result = rate_distortion(tokenizer, [images[:8], images[8:]], [4, 8], codecs=(), perturb=[0.0, 0.25, 0.5, 1.0],
                             perturb_kind=kind)
    clean = next(r for r in result.rows if r["method"] == "tokenizer" and r["num_tokens"] == 8)
    rows = [r for r in result.rows if r["method"] == f"perturbed-{kind}"]
    assert [r["perturb_rate"] for r in rows] == [0.0, 0.25, 0.5, 1.0] and {r["num_tokens"] for r in rows} == {8}
    for metric in ("psnr", "ssim"):
        assert rows[0][metric] == clean[metric]  # exactly
    psnr = [r["psnr"] for r in rows]
    assert psnr[0] > psnr[1] > psnr[2] > psnr[3]
    assert psnr[0] - psnr[3] > (3.0 if kind == "random" else 0.05)


def test_nearest_mistakes_hurt_less_than_random_ones(trained):
    tokenizer, images = trained
    psnr = {}
    for kind in ("random", "nearest"):
        result = rate_distortion(tokenizer, [images], [8], codecs=(), perturb=[0.5], perturb_kind=kind)
        psnr[kind] = result.rows[-1]["psnr"]
    assert psnr["nearest"] > psnr["random"] + 1.0


def test_score_cli_writes_perturbed_rows_in_table_json_csv_and_plot(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no rFID / LPIPS weights
    tokenizer, images = trained
    ckpt = save_checkpoint(tokenizer, tmp_path / "tiny.ckpt")
    folder = save_pngs(images[:6], tmp_path / "images")
    out = tmp_path / "score"
    args = ["score", str(ckpt), str(folder), "--codecs", "none", "--out", str(out), "--perturb", "0.1,0,0.5"]
    assert vistok_main(args + ["--perturb-kind", "nearest", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["perturbation"] == {"rates": [0.0, 0.1, 0.5], "kind": "nearest", "k": None, "seed": 3, "num_tokens": 8}
    rows = [r for r in report["rows"] if r["perturb_rate"] is not None]
    assert [r["method"] for r in rows] == ["perturbed-nearest"] * 3 and "perturbed-nearest" in printed
    assert "perturb_rate" in (out / "rate_distortion.csv").read_text().splitlines()[0]
    assert (out / "perturbation.png").read_bytes()[:4] == b"\x89PNG"
    # the same seed gives the same report; --perturb-kind without --perturb, and soft tokens, are refused
    assert vistok_main(args + ["--perturb-kind", "nearest", "--seed", "3", "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "report.json").read_text())["rows"] == report["rows"]
    capsys.readouterr()
    assert vistok_main(["score", str(ckpt), str(folder), "--perturb-kind", "nearest"]) == 2
    assert "add --perturb" in capsys.readouterr().err
    assert vistok_main(args[:-1] + ["0.1,2"]) == 2
    assert "in [0, 1]" in capsys.readouterr().err
    soft = build_tokenizer(image_size=16, num_tokens=8, quantizer={"_target_": "vistok.tokenizers.quantizers.SoftVQ", "dim": 4, "codebook_size": 8})
    with pytest.raises(VistokError, match="continuous"):
        rate_distortion(soft.eval(), [images[:2]], [8], codecs=(), perturb=[0.1])


# --------------------------------------------------------------------------------------------
# The training option


def test_perturbation_in_training_is_off_by_default_and_replaces_tokens_when_set():
    images = smooth_images(4)
    torch.manual_seed(0)
    plain = build_tokenizer(image_size=16, num_tokens=8)
    assert plain.token_perturb is None and "token_perturb" not in plain.config
    assert plain.train()(images).perturbed is None

    torch.manual_seed(0)
    tok = build_tokenizer(image_size=16, num_tokens=8, token_perturb={"rate": 0.5, "kind": "nearest", "warmup_steps": 10})
    assert tok.config["token_perturb"] == {"rate": 0.5, "p": 1.0, "kind": "nearest", "k": None, "warmup_steps": 10}
    assert build_tokenizer(**tok.config).token_perturb.get_config() == tok.config["token_perturb"]
    tok.load_state_dict(plain.state_dict())
    tok.train()
    assert tok(images, step=0).perturbed.sum(1).tolist() == [0] * 4  # the warm-up starts at rate 0
    assert tok(images, step=5).perturbed.sum(1).tolist() == [2] * 4  # round(0.25 * 8)
    torch.manual_seed(1)
    out = tok(images, step=10)
    assert out.perturbed.sum(1).tolist() == [4] * 4
    torch.manual_seed(1)
    clean = plain.train()(images)
    assert not torch.allclose(out.reconstruction, clean.reconstruction)  # the decoder saw other codes
    assert torch.equal(out.quantizer.indices, clean.quantizer.indices)  # the encoder's own codes are unchanged
    assert tok.eval()(images).perturbed is None  # never in eval
    never = build_tokenizer(image_size=16, num_tokens=8, token_perturb={"rate": 0.5, "p": 0.0})
    assert never.train()(images).perturbed.sum() == 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"rate": 1.5}, "token_perturb.rate"),
    ({"kind": "wild"}, "unknown perturbation kind"),
    ({"kind": "random", "k": 4}, "kind nearest only"),
    ({"kind": "nearest", "k": 4}, "does not apply"),  # FSQ's neighbours are fixed
    ({"warmup": 3}, "unknown token_perturb setting"),
])
def test_bad_training_settings_are_refused(settings, message):
    with pytest.raises(VistokError, match=message):
        build_tokenizer(image_size=16, num_tokens=8, token_perturb=settings)
    with pytest.raises(VistokError, match="continuous"):
        build_tokenizer(image_size=16, num_tokens=8, token_perturb={"rate": 0.1},
                        quantizer={"_target_": "vistok.tokenizers.quantizers.DiagonalGaussian", "dim": 4})


def make_cfg(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_hydra_option_is_null_by_default_and_trains_with_the_step_as_warm_up(tmp_path, monkeypatch):
    assert make_cfg().model.token_perturb is None
    assert build_module(make_cfg("model.image_size=16", "model.patch_size=4")).tokenizer.token_perturb is None
    seen: list[tuple[int | None, int]] = []
    original = TokenPerturbation.forward

    def spy(self, quantizer, codes, indices, step=None):
        result = original(self, quantizer, codes, indices, step)
        seen.append((step, int(result[1].sum())))
        return result

    monkeypatch.setattr(TokenPerturbation, "forward", spy)
    cfg = make_cfg("model.image_size=16", "model.patch_size=4", "model.num_tokens=8", "model.width=16", "model.depth=1",
                   "model.heads=2", "quantizer=vq", "quantizer.dim=4", "quantizer.codebook_size=32",
                   "model.token_perturb={rate: 0.5, kind: nearest, k: 3, warmup_steps: 2}",
                   f"data.data_dir={tmp_path / 'data'}", "data.batch_size=4", "data.num_workers=0", "data.crops_per_photo=2",
                   "data.val_crops_per_photo=2", "data.shuffle_buffer=0", "trainer.max_steps=3", "trainer.val_check_interval=3",
                   "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                   "optim.warmup_steps=1", "validation.grid_images=0", "logger=none")
    result = run_training(cfg, tmp_path / "run")
    assert result.step == 3
    # steps 0, 1, 2: rate 0, 0.25, 0.5 of 8 tokens for each of 4 images
    assert seen == [(0, 0), (1, 8), (2, 16)]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["tokenizer"]["token_perturb"]["k"] == 3


def test_post_training_a_loaded_tokenizer_takes_this_runs_perturbation(fitted_tokenizer, tmp_path):
    """init_from + freeze=[encoder, quantizer] + model.token_perturb: the paper's decoder post-training."""
    tokenizer, _ = fitted_tokenizer
    ckpt = save_checkpoint(tokenizer, tmp_path / "tiny.ckpt")
    module = build_module(make_cfg(f"init_from={ckpt}", "freeze=[encoder,quantizer]",
                                   "model.token_perturb={rate: 0.25, kind: nearest}"))
    assert module.tokenizer.token_perturb.get_config() == {"rate": 0.25, "p": 1.0, "kind": "nearest", "k": None, "warmup_steps": 0}
    assert torch.equal(module.tokenizer.decoder.state_dict()["mask_token"], tokenizer.decoder.state_dict()["mask_token"])
    # the loaded tokenizer's own setting does not carry over: this run's (null) applies
    perturbed = build_tokenizer(**{**tokenizer.config, "token_perturb": {"rate": 0.5}})
    perturbed.load_state_dict(tokenizer.state_dict())
    again = build_module(make_cfg(f"init_from={save_checkpoint(perturbed, tmp_path / 'p.ckpt')}"))
    assert again.tokenizer.token_perturb is None
