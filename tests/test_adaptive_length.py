"""Per-image token counts in use (issue 14, part 3): `vistok encode --target-psnr` writes padded tokens
and a lengths array chosen by score's search, and `vistok decode` decodes each image at its own length."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vistok.cli import main as vistok_main
from vistok.data.images import load_rgb, to_tensor
from vistok.eval.metrics import psnr_per_image
from vistok.tokenizers.cli import PAD_INDEX

from conftest import save_checkpoint, save_pngs

TARGET = 18.0  # dB: the fitted tokenizer reaches it for some images at 1-2 tokens, for most at 3-8, never for noise


@pytest.fixture(scope="module")
def files(fitted_tokenizer, tmp_path_factory):
    tokenizer, images = fitted_tokenizer
    # two images of pixel noise, which no prefix reconstructs to TARGET: the "did not reach" path
    noise = torch.rand(2, *images.shape[1:], generator=torch.Generator().manual_seed(1))
    root = tmp_path_factory.mktemp("adaptive")
    folder = save_pngs(torch.cat([images, noise]), root / "images")
    return tokenizer, save_checkpoint(tokenizer, root / "tiny.ckpt"), folder, root


def test_each_image_decodes_at_its_own_length_and_reaches_the_target_where_score_said_so(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    tokenizer, ckpt, folder, root = files
    assert vistok_main(["score", str(ckpt), str(folder), "--target-psnr", str(TARGET), "--codecs", "none",
                        "--examples", "0", "--out", str(tmp_path / "score")]) == 0
    adaptive = json.loads((tmp_path / "score" / "report.json").read_text())["adaptive"]
    assert vistok_main(["encode", str(ckpt), str(folder), "--target-psnr", str(TARGET), "--out", str(tmp_path / "t.npz")]) == 0
    printed = capsys.readouterr().out
    data = np.load(tmp_path / "t.npz")
    names, tokens, lengths, psnr = [str(n) for n in data["names"]], data["tokens"], data["lengths"], data["psnr"]
    K = tokenizer.max_tokens

    # the same search as score: the same lengths, the same images reaching the target
    histogram = {str(v): int(c) for v, c in zip(*np.unique(lengths, return_counts=True))}
    assert histogram == adaptive["histogram"] and len(histogram) >= 3  # the lengths really differ per image
    reached = psnr >= TARGET
    assert reached.mean() == pytest.approx(adaptive["fraction_reached"]) and 0 < reached.sum() < len(names)
    missed = len(names) - int(reached.sum())
    assert f"{missed} image(s) did not reach {TARGET:g} dB with all {K} tokens and keep all {K}" in printed
    assert (lengths[~reached] == K).all()
    # padded: nothing after an image's length but the padding index; a token file format of version 2
    beyond = np.arange(K)[None, :] >= lengths[:, None]
    assert (tokens[beyond] == PAD_INDEX).all() and (tokens[~beyond] >= 0).all() and int(data["format_version"]) == 2
    assert float(data["target_psnr"]) == TARGET

    assert vistok_main(["decode", str(ckpt), str(tmp_path / "t.npz"), "--out", str(tmp_path / "dec")]) == 0
    assert "each at its own length" in capsys.readouterr().out
    for name, length, chosen_psnr, hit in zip(names, lengths, psnr, reached):
        original = to_tensor(load_rgb(folder / f"{name}.png"))[None]
        decoded = to_tensor(load_rgb(tmp_path / "dec" / f"{name}.png"))[None]
        with torch.no_grad():
            alone = tokenizer.decode(torch.from_numpy(tokens[None, int(np.where(np.array(names) == name)[0][0]), :length]).long())
        assert torch.equal(decoded, alone.mul(255).round().div(255))  # decoded from its own prefix, nothing more
        value = float(psnr_per_image(decoded, original))
        assert value == pytest.approx(float(chosen_psnr), abs=1e-3)
        if hit:
            assert value >= TARGET


def test_decode_with_lengths_and_a_shorter_num_tokens_and_bad_lengths(files, capsys, tmp_path):
    tokenizer, ckpt, folder, root = files
    assert vistok_main(["encode", str(ckpt), str(folder), "--target-psnr", str(TARGET), "--num-tokens", "6",
                        "--out", str(tmp_path / "t.npz")]) == 0
    data = dict(np.load(tmp_path / "t.npz"))
    assert data["tokens"].shape[1] == 6 and data["lengths"].max() <= 6
    # which images stop before 3 tokens depends on the fit; make two of them do so, whatever the fit
    data["lengths"][:2] = [1, 2]
    data["tokens"][0, 1:] = PAD_INDEX
    data["tokens"][1, 2:] = PAD_INDEX
    np.savez(tmp_path / "t.npz", **data)
    assert vistok_main(["decode", str(ckpt), str(tmp_path / "t.npz"), "--num-tokens", "3", "--out", str(tmp_path / "d")]) == 0
    capped = np.minimum(data["lengths"], 3)  # per image: its own length, at most the prefix asked for
    assert capped.min() < 3 and f"mean {capped.mean():.2f}, {capped.min()} to 3 of 8 tokens" in capsys.readouterr().out
    data["lengths"] = data["lengths"] + 10
    broken = tmp_path / "broken.npz"
    np.savez(broken, **data)
    assert vistok_main(["decode", str(ckpt), str(broken), "--out", str(tmp_path / "d2")]) == 2
    assert "lengths array" in capsys.readouterr().err
    assert vistok_main(["encode", str(ckpt), str(folder), "--target-psnr", "-3", "--out", str(tmp_path / "u.npz")]) == 2
    assert "--target-psnr" in capsys.readouterr().err
