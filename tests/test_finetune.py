"""Fine-tuning from weights: ``init_from`` (export, import or checkpoint) and ``freeze``.

Tiny CPU runs on the embedded sample data: a one-block TiTok at 16 px, and the LlamaGen VQ-16
reference fixture imported at 32 px (a 2x2 token grid).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.export import load
from vistok.tokenizers.imports import import_tokenizer
from vistok.tokenizers.imports.common import write_import
from vistok.tokenizers.training import run as training

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
TINY_TITOK = ["model.image_size=16", "model.patch_size=4", "model.num_tokens=8", "model.width=16", "model.depth=1",
              "model.heads=2", "quantizer=vq", "quantizer.dim=4", "quantizer.codebook_size=32"]


def overrides(data_dir: Path, steps: int) -> list[str]:
    return [f"data.data_dir={data_dir}", "data.batch_size=4", "data.num_workers=0",
            "data.crops_per_photo=2", "data.val_crops_per_photo=1", "data.shuffle_buffer=0", "data.batches_per_epoch=50",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "optim.warmup_steps=1",
            "optim.lr=1e-3", "validation.grid_images=0"]


class Snapshots(pl.Callback):
    """The tokenizer's and the EMA copy's weights when training starts and ends, and the optimizer's size."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.start = clone(pl_module.tokenizer.state_dict())
        self.optimized = sum(len(group["params"]) for group in trainer.optimizers[0].param_groups)

    def on_train_end(self, trainer, pl_module):
        self.end = clone(pl_module.tokenizer.state_dict())
        self.ema_end = clone(pl_module.ema.module.state_dict())


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def part(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(name + ".")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample-data")


@pytest.fixture(scope="module")
def titok_checkpoint(data_dir, tmp_path_factory, make_cfg) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain")
    training.run_training(make_cfg(*TINY_TITOK, *overrides(data_dir, steps=2)), run_dir)
    return next(run_dir.rglob("last.ckpt"))


def test_init_from_a_checkpoint_starts_fresh_and_freeze_decoder_trains_only_the_rest(titok_checkpoint, data_dir, tmp_path, make_cfg, run_with):
    cfg = make_cfg(*overrides(data_dir, steps=3), f"init_from={titok_checkpoint}", "freeze=[decoder]")  # 16 px from the checkpoint
    snap = Snapshots()
    run_with(cfg, tmp_path, snap)
    model = load(titok_checkpoint)  # the checkpoint's EMA weights, as export writes them
    initial = model.state_dict()
    assert snap.step == 0  # a fresh run: step, optimizer and schedule start over
    assert same(snap.start, initial)
    assert same(part(snap.end, "decoder"), part(initial, "decoder"))
    assert same(part(snap.ema_end, "decoder"), part(initial, "decoder"))
    for name in ("encoder", "quantizer"):
        assert not same(part(snap.end, name), part(initial, name)), name
    assert snap.optimized == len(list(model.parameters())) - len(list(model.decoder.parameters()))


def test_decoder_only_fine_tune_of_an_imported_llamagen(data_dir, tmp_path, make_cfg, run_with):
    state = load_file(str(REFERENCE / "llamagen_vq16_tiny.state_dict.safetensors"))
    torch.save({"model": state, "args": argparse.Namespace(vq_model="VQ-16")}, tmp_path / "vq_ds16_c2i.pt")
    imported = import_tokenizer("llamagen", tmp_path / "vq_ds16_c2i.pt", image_size=32)
    export = write_import(imported, tmp_path / "vq_ds16_c2i.pt", tmp_path / "llamagen")

    # data.image_size follows the imported model's 32 px, not the model group's
    cfg = make_cfg(*overrides(data_dir, steps=2), f"init_from={export}", "freeze=[encoder,quantizer]")
    snap = Snapshots()
    run_with(cfg, tmp_path / "run", snap)
    initial = imported.tokenizer.state_dict()
    assert same(snap.start, initial)
    for name in ("encoder", "quantizer"):
        assert same(part(snap.end, name), part(initial, name)), name
        assert same(part(snap.ema_end, name), part(initial, name)), name
    assert not same(part(snap.end, "decoder"), part(initial, "decoder"))
    assert snap.optimized == len(list(imported.tokenizer.decoder.parameters()))
    assert load(next((tmp_path / "run").rglob("last.ckpt"))).arch == "llamagen"
    with pytest.raises(VistokError, match="decodes only its full grid of 4 tokens"):  # validation at K only
        training.run_training(make_cfg(*overrides(data_dir, steps=2), f"init_from={export}", "validation.token_counts=[2,4]"),
                              tmp_path / "never")


@pytest.mark.parametrize(("setting", "message"), [
    ("freeze=[encoder,codebook]", "'codebook', which is not a part"),
    ("freeze=[encoder,quantizer,decoder]", "nothing to train"),
    ("init_from=/nonexistent/export", "does not exist"),
])
def test_bad_fine_tune_settings_are_refused_before_training(data_dir, tmp_path, setting, message, make_cfg):
    with pytest.raises(VistokError, match=message):
        training.run_training(make_cfg(*TINY_TITOK, *overrides(data_dir, steps=2), setting), tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))
