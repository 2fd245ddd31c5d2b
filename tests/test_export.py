"""Export, load, and the encode/decode/info commands (tokenizers/export.py, tokenizers/cli.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vistok
import vistok.cli as vistok_cli
from vistok.data.images import to_pil
from vistok.data.sources import iter_image_source
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.export import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, export_checkpoint, load, load_with_metadata
from vistok.tokenizers.model import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# About 30k parameters at 16 px: a two-step fit and every test here run in seconds on a CPU.
TINY = {
    "arch": "titok", "preset": "tiny", "image_size": 16, "num_tokens": 8, "patch_size": 4,
    "width": 32, "depth": 1, "heads": 2,
    "quantizer": {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [5, 5, 5]},
    "token_dropout": {"p": 1.0},
}


@dataclass
class Run:
    """A real training checkpoint and what it must export to."""

    path: Path
    raw: dict  # the trained weights (state_dict["tokenizer.*"])
    ema: dict  # the EMA weights the module validated with
    ema_model: torch.nn.Module  # the module's own EMA model, straight from memory after fit
    metrics: dict


def model_from(state: dict) -> torch.nn.Module:
    model = build_tokenizer(**TINY)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Run:
    """Two generator steps of the real TokenizerModule (EMA on, with a discriminator), then a Lightning checkpoint."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from vistok.tokenizers.training.module import TokenizerModule

    torch.manual_seed(0)
    batches = [{"image": torch.rand(3, 16, 16)} for _ in range(8)]
    module = TokenizerModule(
        TINY,
        loss={"adversarial": {"weight": 0.1, "channels": 8, "num_layers": 1}},
        optim={"lr": 1e-3, "warmup_steps": 1},
        validation={"grid_images": 0},
    )
    trainer = pl.Trainer(
        max_steps=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=4), DataLoader(batches, batch_size=4))
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert any(k.startswith("discriminator.") for k in checkpoint["state_dict"])  # must not reach an export
    raw = {k[len("tokenizer."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("tokenizer.")}
    ema_model = module.eval_model.eval()
    assert ema_model is not module.tokenizer
    return Run(path, raw, checkpoint["ema_state_dict"], ema_model, checkpoint["vistok"]["metrics"])


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    return export_checkpoint(ckpt.path, tmp_path_factory.mktemp("export") / "tok")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Ten small RGB images of odd sizes (so resize + center crop is exercised), one in a subfolder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        size = (20 + i, 17 + 2 * i)
        target = folder / ("sub" if i == 9 else "") / f"img{i}.png"
        target.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(target)
    return folder


def cli(*args: str) -> int:
    return vistok_cli.main([str(a) for a in args])


def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def copy_export(exported: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for file in exported.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


# ---- export and load ----------------------------------------------------------------------


def test_export_then_load_is_bit_identical_to_the_ema_model(ckpt, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    # Only the tokenizer: no discriminator, loss or optimizer state.
    assert set(load_file(exported / WEIGHTS_FILE)) == set(ckpt.ema) == set(ckpt.ema_model.state_dict())

    tokenizer = vistok.load(exported)
    assert not tokenizer.training
    x = images()
    with torch.no_grad():
        tokens = ckpt.ema_model.encode(x)
        assert torch.equal(tokenizer(x).reconstruction, ckpt.ema_model(x).reconstruction)
        assert torch.equal(tokenizer.encode(x), tokens)
        assert torch.equal(tokenizer.decode(tokens[:, :3]), ckpt.ema_model.decode(tokens[:, :3]))

    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["tokenizer"] == ckpt.ema_model.config
    assert (config["image_size"], config["max_tokens"], config["codebook_size"]) == (16, 8, 125)
    assert "[0, 1]" in config["input"]["images"]
    assert config["weights"]["kind"] == "ema"
    assert config["training"]["step"] == 2
    assert config["metrics"] == ckpt.metrics and "val/psnr" in ckpt.metrics
    assert config["vistok_version"]
    card = (exported / "README.md").read_text()
    assert f"| val/psnr | {ckpt.metrics['val/psnr']:.6g} |" in card and "EMA weights" in card


def test_no_ema_exports_the_raw_weights(ckpt, tmp_path, capsys):
    assert cli("export", ckpt.path, tmp_path / "raw", "--no-ema") == 0
    assert "raw weights" in capsys.readouterr().out
    tokenizer = load(tmp_path / "raw")
    x = images()
    with torch.no_grad():
        assert torch.equal(tokenizer(x).reconstruction, model_from(ckpt.raw)(x).reconstruction)
        assert not torch.equal(tokenizer(x).reconstruction, ckpt.ema_model(x).reconstruction)


def test_loading_a_checkpoint_directly_uses_its_ema_weights(ckpt, exported):
    loaded = load_with_metadata(ckpt.path)
    assert not loaded.tokenizer.training
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.tokenizer(x).reconstruction, ckpt.ema_model(x).reconstruction)
        assert torch.equal(load(ckpt.path, use_ema=False)(x).reconstruction, model_from(ckpt.raw)(x).reconstruction)
    # Same weights, same fingerprint, whichever way they were loaded.
    assert loaded.fingerprint == load_with_metadata(exported).fingerprint
    assert loaded.metrics == ckpt.metrics


def test_export_refuses_a_non_empty_directory_without_force(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli("export", ckpt.path, out) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err
    assert (out / "notes.txt").read_text() == "keep me"

    assert cli("export", ckpt.path, out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    load(out)
    # Nothing temporary is left beside the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_into_an_empty_directory(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    export_checkpoint(ckpt.path, tmp_path / "empty")
    load(tmp_path / "empty")


def test_force_never_deletes_the_checkpoint_being_exported(ckpt, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(ckpt.path.read_bytes())
    with pytest.raises(VistokError, match="would delete it"):
        export_checkpoint(run_dir / "last.ckpt", run_dir, force=True)
    assert (run_dir / "last.ckpt").is_file()


def test_export_without_ema_weights_asks_for_no_ema(tmp_path):
    model = build_tokenizer(**TINY)
    torch.save({"state_dict": {f"tokenizer.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"tokenizer": model.config}}, tmp_path / "noema.ckpt")
    with pytest.raises(VistokError, match="--no-ema"):
        export_checkpoint(tmp_path / "noema.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_checkpoint(tmp_path / "noema.ckpt", tmp_path / "out", use_ema=False)
    # Loading a checkpoint falls back to its raw weights.
    loaded = load_with_metadata(tmp_path / "noema.ckpt")
    assert loaded.config["weights"]["kind"] == "raw"
    with torch.no_grad():
        assert torch.equal(loaded.tokenizer(images()).reconstruction, model.eval()(images()).reconstruction)


def test_soft_tokens_round_trip_through_the_command_line(image_folder, tmp_path, capsys):
    """SoftVQ: (N, k, D) float codes in the .npz, decoded PNGs equal to the Python API's."""
    model = build_tokenizer(**{**TINY, "quantizer": {"_target_": "vistok.tokenizers.quantizers.SoftVQ", "dim": 4, "codebook_size": 16}})
    torch.save({"state_dict": {f"tokenizer.{k}": v for k, v in model.state_dict().items()},
                "ema_state_dict": model.state_dict(), "hyper_parameters": {"tokenizer": model.config}},
               tmp_path / "soft.ckpt")
    assert cli("export", tmp_path / "soft.ckpt", tmp_path / "soft") == 0
    assert cli("encode", tmp_path / "soft", image_folder / "img1.png", image_folder / "sub", "--out", tmp_path / "t.npz") == 0
    assert cli("decode", tmp_path / "soft", tmp_path / "t.npz", "--out", tmp_path / "recon", "--num-tokens", "5") == 0
    assert "soft codes of dimension 4" in capsys.readouterr().out

    tokenizer = load(tmp_path / "soft")
    batch = torch.stack([image for _, image in iter_image_source(str(image_folder / "img1.png"), 16)])
    with torch.no_grad():
        codes = tokenizer.encode(batch)
        expected = tokenizer.decode(codes[:, :5])
    with np.load(tmp_path / "t.npz", allow_pickle=False) as data:
        assert data["tokens"].dtype == np.float32 and data["tokens"].shape == (2, 8, 4)
        assert np.array_equal(data["tokens"][:1], codes.numpy())
        assert int(data["codebook_size"]) == -1 and str(data["kind"]) == "codes"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "recon" / "img1.png")), np.asarray(to_pil(expected[0])))


# ---- refusals ------------------------------------------------------------------------------


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    edit(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, expected",
    [
        # A wider model: the first tensor whose shape differs is named.
        (lambda c: c["tokenizer"].update(width=48), [r"does not match .*model\.safetensors: tensor '[\w.]+' has shape \([\d, ]*32\) in the weights but \([\d, ]*48\)"]),
        # One more FSQ level than the latent width: projections the weights do not have.
        (lambda c: c["tokenizer"]["quantizer"].update(levels=[5, 5, 5, 5]), [r"tensor 'quantizer\.project_in\.weight' of the model it builds is missing"]),
        # Same shapes, different grid: caught by the config recorded inside the weights file.
        (lambda c: c["tokenizer"]["quantizer"].update(levels=[8, 5, 5]), [r"setting 'quantizer\.levels' differs"]),
    ],
    ids=["width", "levels-count", "levels-values"],
)
def test_a_tampered_config_is_refused_naming_the_mismatch(exported, tmp_path, capsys, edit, expected):
    tampered = copy_export(exported, tmp_path)
    _edit_config(tampered, edit)
    assert cli("info", tampered) == 2
    err = capsys.readouterr().err
    assert err.startswith("vistok info: error: ") and err.count("\n") == 1
    for pattern in expected:
        assert re.search(pattern, err), err


def test_a_truncated_safetensors_file_is_refused(exported, tmp_path, capsys):
    broken = copy_export(exported, tmp_path)
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(VistokError, match="is truncated or corrupted"):
        load(broken)
    assert cli("encode", broken, "sample", "--out", tmp_path / "t.npz") == 2
    assert "model.safetensors is truncated or corrupted" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def test_corrupted_weight_bytes_fail_the_recorded_checksum(exported, tmp_path):
    broken = copy_export(exported, tmp_path)
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: the header still parses
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(VistokError, match="does not match the SHA-256 recorded in config.json"):
        load(broken)


def test_an_unknown_format_version_is_refused(exported, tmp_path, capsys):
    future = copy_export(exported, tmp_path)
    _edit_config(future, lambda c: c.update(format_version=99))
    assert cli("info", future) == 2
    err = capsys.readouterr().err
    assert "export format version 99" in err and "cannot read" in err and "upgrade vistok" in err


def test_a_corrupted_or_foreign_checkpoint_is_refused(ckpt, tmp_path, capsys):
    data = ckpt.path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    assert cli("info", tmp_path / "cut.ckpt") == 2
    assert "is not a readable PyTorch checkpoint" in capsys.readouterr().err

    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(VistokError, match="not a vistok training checkpoint"):
        load(tmp_path / "other.ckpt")

    # weights_only loading must refuse to build arbitrary objects (here a pathlib.Path).
    torch.save({"hyper_parameters": {"tokenizer": tmp_path}}, tmp_path / "pickled.ckpt")
    with pytest.raises(VistokError, match="other than tensors and plain values, which vistok never unpickles"):
        load(tmp_path / "pickled.ckpt")

    with pytest.raises(VistokError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(VistokError, match="no config.json"):
        load(tmp_path)


def test_errors_reach_the_shell_as_one_line_without_traceback(exported, tmp_path):
    future = copy_export(exported, tmp_path)
    _edit_config(future, lambda c: c.update(format_version=2))
    result = subprocess.run([sys.executable, "-m", "vistok", "info", str(future)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "export format version 2" in result.stderr


# ---- encode / decode / info ----------------------------------------------------------------


def test_encode_then_decode_on_the_command_line_equals_the_python_api(exported, image_folder, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.npz"
    assert cli("encode", exported, image_folder, "--out", tokens_file, "--batch-size", "4", "--device", "cpu") == 0
    capsys.readouterr()

    tokenizer = load(exported)
    names, batch = zip(*iter_image_source(str(image_folder), tokenizer.image_size))
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack(batch))
    with np.load(tokens_file, allow_pickle=False) as data:
        assert data["tokens"].dtype == np.int32 and data["tokens"].shape == (10, 8)
        assert np.array_equal(data["tokens"], expected.numpy())
        assert list(data["names"]) == [str(n) for n in names]
        assert int(data["num_tokens"]) == 8 and int(data["max_tokens"]) == 8 and int(data["codebook_size"]) == 125
        assert str(data["fingerprint"]) == load_with_metadata(exported).fingerprint

    out = tmp_path / "recon"
    assert cli("decode", exported, tokens_file, "--out", out, "--batch-size", "3") == 0
    assert "prefix" not in capsys.readouterr().out
    with torch.no_grad():
        reconstructions = tokenizer.decode(expected)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted([f"img{i}.png" for i in range(9)] + ["sub/img9.png"])
    for name, image in zip(names, reconstructions):
        png = out / Path(str(name)).with_suffix(".png")
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(to_pil(image)))
    assert not list(out.rglob(".*"))  # no temporary files left


def test_a_prefix_decodes_and_is_announced(exported, image_folder, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.npz"
    assert cli("encode", exported, image_folder / "img3.png", image_folder / "sub", "--num-tokens", "6", "--out", tokens_file) == 0
    assert cli("decode", exported, tokens_file, "--out", tmp_path / "recon", "--num-tokens", "3") == 0
    assert "the first 3 of the 6 tokens" in capsys.readouterr().out

    tokenizer = load(exported)
    with np.load(tokens_file, allow_pickle=False) as data:
        tokens = torch.from_numpy(data["tokens"]).long()
    assert tokens.shape == (2, 6)
    with torch.no_grad():
        expected = tokenizer.decode(tokens[:, :3])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "recon" / "img3.png")), np.asarray(to_pil(expected[0])))

    # More tokens than the file holds, or than the model has, are refused.
    assert cli("decode", exported, tokens_file, "--out", tmp_path / "more", "--num-tokens", "7") == 2
    assert "more tokens than" in capsys.readouterr().err
    assert cli("encode", exported, image_folder / "img3.png", "--num-tokens", "9", "--out", tmp_path / "x.npz") == 2
    assert "outside 1..8" in capsys.readouterr().err
    assert not (tmp_path / "more").exists() and not (tmp_path / "x.npz").exists()


def test_an_unknown_device_is_one_sentence_naming_the_flag(exported, image_folder, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.npz"
    assert cli("encode", exported, image_folder / "img0.png", "--out", tokens_file, "--device", "cpu") == 0
    capsys.readouterr()
    for command, source, out in (("encode", image_folder / "img0.png", tmp_path / "x.npz"), ("decode", tokens_file, tmp_path / "recon")):
        assert cli(command, exported, source, "--out", out, "--device", "nope") == 2
        assert capsys.readouterr().err.splitlines() == [
            f"vistok {command}: error: --device 'nope' is not a device; use auto, cpu, cuda or cuda:N."]
        assert not out.exists()


def test_decode_refuses_tokens_of_another_codebook(exported, image_folder, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.npz"
    assert cli("encode", exported, image_folder / "img0.png", "--out", tokens_file) == 0
    with np.load(tokens_file, allow_pickle=False) as data:
        arrays = dict(data)
    arrays["tokens"] = arrays["tokens"] + 1000
    np.savez(tmp_path / "bad.npz", **arrays)
    assert cli("decode", exported, tmp_path / "bad.npz", "--out", tmp_path / "recon") == 2
    assert "outside [0, 125)" in capsys.readouterr().err
    assert not (tmp_path / "recon").exists()


def test_info_prints_the_config_and_metrics(exported, ckpt, capsys):
    assert cli("info", exported) == 0
    out = capsys.readouterr().out
    assert "titok / FSQ" in out and "125 codes" in out and "up to 8" in out
    assert "val/psnr" in out and f"{ckpt.metrics['val/psnr']:.6g}" in out
    assert cli("info", ckpt.path, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metrics"] == ckpt.metrics and info["tokenizer"]["width"] == 32


def test_png_names_stay_inside_the_output_directory():
    from vistok.tokenizers.cli import png_paths

    paths = [p.as_posix() for p in png_paths(["../../etc/x.jpg", "/abs/y.png", "a.jpg", "a.png", "key0001"])]
    assert paths == ["_/_/etc/x.png", "abs/y.png", "a.jpg.png", "a.png.png", "key0001.png"]


def test_files_that_are_not_checkpoints_or_token_files_are_named_so(exported, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: titok\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name in ("config.yaml", "photo.jpg", "empty.ckpt"):
        assert cli("info", tmp_path / name) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"{tmp_path / name} is not a PyTorch checkpoint" in err[0], err
        assert "weights_only" not in err[0]
    (tmp_path / "tokens.txt").write_text("1 2 3\n")
    assert cli("decode", exported, tmp_path / "tokens.txt", "--out", tmp_path / "png") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "tokens.txt is not an .npz file" in err[0] and "pickle" not in err[0], err


def test_a_checkpoint_folder_given_to_export_gets_a_hint_without_a_doubled_folder(ckpt, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    with pytest.raises(VistokError, match=re.escape(f"such as {folder / 'last.ckpt'}.")):
        export_checkpoint(folder, tmp_path / "out")
    with pytest.raises(VistokError, match=re.escape(f"such as {folder / 'last.ckpt'}.")):
        export_checkpoint(folder.parent, tmp_path / "out")  # the run folder: its checkpoints/last.ckpt


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_follow_the_umask(ckpt, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_checkpoint(ckpt.path, tmp_path / "tok")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {WEIGHTS_FILE: 0o666 & ~umask, CONFIG_FILE: 0o666 & ~umask, "README.md": 0o666 & ~umask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
