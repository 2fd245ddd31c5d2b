"""Files written by vistok 0.1, when the package was imported as `tokenizers`, still work after the rename.

tests/fixtures/legacy_v0_1 holds a training checkpoint, its format-1 export and a token file, all
written by the old code (NOTES.md there says how); their configs name `tokenizers.quantizers.*`.
`io.safetensors` holds what the old code computed from them on four images.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vistok
import vistok.cli as vistok_cli
from vistok.tokenizers.export import load_with_metadata
from vistok.tokenizers.training.run import run_training
from vistok.tokenizers.training.settings import CONFIG_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_v0_1"
IO = load_file(FIXTURES / "io.safetensors")
SOURCES = {  # name in io.safetensors -> (path, load arguments, fingerprint the old code computed)
    "export": (FIXTURES / "export", {}, "f3f13e076e140c4e"),
    "ckpt_ema": (FIXTURES / "last.ckpt", {}, "f3f13e076e140c4e"),
    "ckpt_raw": (FIXTURES / "last.ckpt", {"use_ema": False}, "bb13096ed0ec11d0"),
}


def test_the_fixtures_name_the_old_package():
    assert '"_target_": "tokenizers.quantizers.VectorQuantizer"' in (FIXTURES / "export" / "config.json").read_text()
    ckpt = torch.load(FIXTURES / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["tokenizer"]["quantizer"]["_target_"] == "tokenizers.quantizers.VectorQuantizer"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_old_exports_and_checkpoints_load_and_give_the_same_outputs(name):
    path, kwargs, fingerprint = SOURCES[name]
    loaded = load_with_metadata(path, **kwargs)
    assert loaded.fingerprint == fingerprint  # unchanged by the rename: old token files still match
    tok = loaded.tokenizer
    with torch.no_grad():
        tokens = tok.encode(IO["images"])
        assert torch.equal(tokens, IO[f"{name}.tokens"])
        torch.testing.assert_close(tok.decode(tokens), IO[f"{name}.decoded@8"], rtol=0, atol=1e-6)
        torch.testing.assert_close(tok.decode(tokens[:, :2]), IO[f"{name}.decoded@2"], rtol=0, atol=1e-6)
    assert type(vistok.load(path, **kwargs)) is type(tok)


def test_old_token_files_decode_without_a_fingerprint_warning(tmp_path, capsys):
    assert vistok_cli.main(["decode", str(FIXTURES / "export"), str(FIXTURES / "tokens.npz"), "--out", str(tmp_path / "rec"),
                            "--device", "cpu"]) == 0
    assert "fingerprint" not in capsys.readouterr().err
    decoded = np.asarray(Image.open(tmp_path / "rec" / "img0.png"), dtype=np.float32) / 255
    expected = IO["export.decoded@8"][0].permute(1, 2, 0).numpy()
    assert np.abs(decoded - expected).max() <= 0.5 / 255 + 1e-6  # PNGs round to 8 bits


def test_an_old_checkpoint_re_exports_and_the_new_export_names_the_new_package(tmp_path):
    out = tmp_path / "export"
    assert vistok_cli.main(["export", str(FIXTURES / "last.ckpt"), str(out)]) == 0
    assert '"_target_": "vistok.tokenizers.quantizers.VectorQuantizer"' in (out / "config.json").read_text()
    reloaded = load_with_metadata(out)
    assert reloaded.fingerprint == SOURCES["ckpt_ema"][2]
    with torch.no_grad():
        assert torch.equal(reloaded.tokenizer.encode(IO["images"]), IO["ckpt_ema.tokens"])


def test_training_resumes_from_an_old_checkpoint(tmp_path):
    from hydra import compose, initialize_config_dir

    ckpt = tmp_path / "old.ckpt"
    shutil.copy(FIXTURES / "last.ckpt", ckpt)
    # The fixture's run (NOTES.md), two steps further; vq's defaults then had no dead-code restarts.
    # The demo's model then had TiTok's linear head, ViT's position init and no attention bias.
    overrides = ["experiment=demo", "model.decoder_head=null", "model.encoder_pos_std=null", "model.attn_bias_std=null",
                 "model.width=32", "model.heads=2", "model.depth=1", "model.num_tokens=8",
                 "model.patch_size=8", "model.image_size=32", "quantizer=vq", "quantizer.codebook_size=64", "quantizer.dim=4",
                 "quantizer.dead_code_steps=0",
                 f"data.data_dir={tmp_path / 'data'}", "data.crops_per_photo=2", "data.val_crops_per_photo=1",
                 "data.batch_size=4", "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none",
                 "validation.grid_images=0", f"resume={ckpt}"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    result = run_training(cfg, tmp_path / "run")
    assert result.step == 6
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6
    assert saved["hyper_parameters"]["tokenizer"]["quantizer"]["_target_"] == "vistok.tokenizers.quantizers.VectorQuantizer"
