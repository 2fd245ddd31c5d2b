"""Two-stage TiTok (experiment=titok_two_stage, then titok_two_stage_decoder) at a tiny size on the CPU:
stage 1 learns a 2D VQ teacher's codes by cross-entropy, stage 2 fine-tunes the decoders on pixels."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vistok
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.export import describe_tokenizer, write_export
from vistok.tokenizers.model import build_tokenizer
from vistok.tokenizers.training import two_stage
from vistok.tokenizers.training.run import run_training
from vistok.tokenizers.training.settings import CONFIG_DIR

# A 32 px conv VQ teacher (4x4 grid) and a one-block TiTok whose patch 8 gives the same 4x4 grid.
TINY_TITOK = ["model.preset=tiny", "model.image_size=32", "model.patch_size=8", "model.num_tokens=8",
              "model.width=32", "model.depth=1", "model.heads=2", "quantizer.dim=4", "quantizer.codebook_size=32"]


def make_cfg(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def small_run(data_dir: Path, steps: int) -> list[str]:
    return ["data=sample", f"data.data_dir={data_dir}", "data.batch_size=4", "data.num_workers=0",
            "data.crops_per_photo=2", "data.val_crops_per_photo=2", "data.shuffle_buffer=0", "trainer=cpu",
            "logger=csv", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "optim.warmup_steps=1", "validation.grid_images=2",
            "loss.perceptual.weight=0", "ema.enabled=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """An untrained conv VQ tokenizer written as an export (random weights give varied codes)."""
    torch.manual_seed(0)
    model = build_tokenizer("conv", "tiny", image_size=32, quantizer={
        "_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 8, "codebook_size": 64}).eval()
    out = tmp_path_factory.mktemp("teacher") / "vq"
    return write_export(model, {**describe_tokenizer(model, model.config, "raw"), "metrics": {}}, out)


def test_stage_one_cross_entropy_learns_the_teachers_codes(teacher):
    torch.manual_seed(0)
    loaded = two_stage.load_teacher(teacher)
    config = two_stage.with_teacher({"arch": "titok_original", "image_size": 32, "patch_size": 8, "num_tokens": 8,
                                     "width": 32, "depth": 1, "heads": 2, "quantizer": {
                                         "_target_": "vistok.tokenizers.quantizers.VectorQuantizer", "dim": 4,
                                         "codebook_size": 32}}, loaded)
    tokenizer = build_tokenizer(**config)
    two_stage.copy_teacher(tokenizer, loaded)
    images = torch.rand(4, 3, 32, 32)
    optimizer = torch.optim.Adam([p for n, p in tokenizer.named_parameters() if "pixel_" not in n], lr=3e-3)
    losses = []
    for _ in range(30):
        out = two_stage.proxy_forward(tokenizer, loaded, images)
        optimizer.zero_grad()
        (out.loss + out.quantizer.loss).backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] > math.log(64) * 0.8  # chance level at the start (64 teacher codes)
    assert losses[-1] < 0.6 * losses[0] and out.accuracy > 0.25  # chance: 1/64
    # the pixel stage is the teacher's codebook and decoder
    assert torch.equal(tokenizer.decoder.pixel_decoder.conv_out.weight, loaded.decoder.state_dict()["conv_out.weight"])


def test_both_stages_end_to_end(teacher, tmp_path):
    data_dir = tmp_path / "data"
    stage1 = run_training(make_cfg("experiment=titok_two_stage", f"teacher={teacher}", *TINY_TITOK,
                                   *small_run(data_dir, 2)), tmp_path / "stage1")
    assert stage1.step == 2 and math.isfinite(stage1.metrics["val/psnr"])
    logged = (tmp_path / "stage1" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/proxy", "train/proxy_accuracy"} <= set(logged) and "train/l2" not in logged
    first = vistok.load(stage1.last_checkpoint, use_ema=False)
    teacher_weights = vistok.load(teacher).decoder.state_dict()
    for key, value in first.decoder.pixel_decoder.state_dict().items():  # no gradient reached the teacher's copy
        assert torch.equal(value, teacher_weights[key]), key

    stage2 = run_training(make_cfg("experiment=titok_two_stage_decoder", f"init_from={stage1.last_checkpoint}",
                                   *small_run(data_dir, 2), "loss.adversarial.start=1",
                                   "loss.adversarial.num_layers=1"), tmp_path / "stage2")
    assert stage2.step == 2 and math.isfinite(stage2.metrics["val/psnr"])
    second = vistok.load(stage2.last_checkpoint, use_ema=False)
    for part in ("encoder", "quantizer"):  # frozen: bit for bit
        for key, value in getattr(first, part).state_dict().items():
            assert torch.equal(value, getattr(second, part).state_dict()[key]), f"{part}.{key}"
    changed = {key for key, value in first.decoder.state_dict().items() if not torch.equal(value, second.decoder.state_dict()[key])}
    assert any(key.startswith("pixel_decoder.") for key in changed) and any(key.startswith("head.") for key in changed)


def test_stage_one_refuses_what_cannot_work(teacher):
    with pytest.raises(VistokError, match="teacher=PATH"):
        from vistok.tokenizers.training.module import TokenizerModule
        TokenizerModule({"arch": "titok_original"}, loss={"proxy_weight": 1.0, "l1_weight": 0.0})
    with pytest.raises(VistokError, match="loss.l1_weight"):
        TokenizerModule({"arch": "titok_original", "image_size": 32, "patch_size": 8}, teacher=str(teacher),
                        loss={"proxy_weight": 1.0})
    with pytest.raises(VistokError, match="model=titok_original"):
        TokenizerModule({"arch": "titok"}, teacher=str(teacher), loss={"proxy_weight": 1.0, "l1_weight": 0.0})
    with pytest.raises(VistokError, match=r"\(image_size / patch_size\)\^2 = 16"):
        TokenizerModule({"arch": "titok_original", "image_size": 32, "patch_size": 16}, teacher=str(teacher),
                        loss={"proxy_weight": 1.0, "l1_weight": 0.0})


def test_an_imported_llamagen_vq_is_a_teacher(tmp_path):
    """The teacher can be another project's released 2D VQ model (here the LlamaGen VQ-16 reference fixture)."""
    from safetensors.torch import load_file

    from vistok.tokenizers.imports import import_tokenizer
    from vistok.tokenizers.imports.common import write_import

    weights = load_file(Path(__file__).parent / "fixtures" / "reference" / "llamagen_vq16_tiny.state_dict.safetensors")
    torch.save({"model": weights}, tmp_path / "vq_ds16.pt")
    write_import(import_tokenizer("llamagen", tmp_path / "vq_ds16.pt"), tmp_path / "vq_ds16.pt", tmp_path / "teacher")
    teacher = two_stage.load_teacher(tmp_path / "teacher")
    grid = int(teacher.max_tokens ** 0.5)
    tokenizer = build_tokenizer(**two_stage.with_teacher({
        "arch": "titok_original", "image_size": teacher.image_size, "patch_size": teacher.image_size // grid,
        "num_tokens": 8, "width": 32, "depth": 1, "heads": 2,
        "quantizer": {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [5, 5, 5]}}, teacher))
    two_stage.copy_teacher(tokenizer, teacher)
    torch.manual_seed(0)
    images = torch.rand(1, 3, teacher.image_size, teacher.image_size)
    out = two_stage.proxy_forward(tokenizer, teacher, images)
    assert abs(out.loss.item() - math.log(teacher.codebook_size)) < 1.0  # untrained: about chance
    with torch.no_grad():
        assert tokenizer.eval().decode(tokenizer.encode(images)).shape == images.shape
