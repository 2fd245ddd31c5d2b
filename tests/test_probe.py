"""`vistok probe`: the AR model, its factorised heads, the token cache, and what the probe tells apart.

A tiny 1D tokenizer (16 px, 8 FSQ tokens of 45 codes) is trained once per module for a few hundred
steps on the embedded sample; every probe is a CPU-tiny AR model trained for a few hundred steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vistok.cli import main as cli_main
from vistok.eval import probe as probe_lib
from vistok.eval.pretrained import FIDInceptionV3
from vistok.eval.probe import probe_tokenizer
from vistok.tokenizers.ar import ARProbe, subcode_sizes
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.export import load
from vistok.tokenizers.model import build_tokenizer
from vistok.tokenizers.training.settings import CONFIG_DIR

PROBE = dict(model="tiny", steps=200, num_samples=4, inception_weights=False,
             overrides=["trainer.enable_progress_bar=false", "logger=none", "trainer.val_check_interval=200"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probe-data")


@pytest.fixture(scope="module")
def sample_urls(data_dir) -> tuple[str, str]:
    """The embedded sample at 16 px: 480 training crops, 128 validation crops of held-out photos."""
    from vistok.data.sample import sample_shard_urls

    train, val = sample_shard_urls(16, data_dir=data_dir, crops_per_photo=32, val_crops_per_photo=32)
    return "::".join(train), "::".join(val)


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory, data_dir, sample_urls) -> Path:
    """A demo-recipe tokenizer (L2 loss, tail-token dropout) trained 300 steps at 16 px: its tokens carry image structure."""
    from vistok.tokenizers.training.run import run_training

    run_dir = tmp_path_factory.mktemp("probe-demo")
    overrides = ["experiment=demo", "model.image_size=16", "model.patch_size=4", "model.num_tokens=8", "model.width=32",
                 "model.depth=1", "model.heads=2", "quantizer.levels=[5,3,3]", f"data.data_dir={data_dir}", "data.batch_size=16",
                 "data.crops_per_photo=32", "data.val_crops_per_photo=32", "data.shuffle_buffer=0", "trainer.max_steps=300",
                 "trainer.val_check_interval=300", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "logger=none", "callbacks.lr_monitor=null", "optim.warmup_steps=20",
                 "validation.grid_images=0", "ema.enabled=false", f"run_dir={run_dir}"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return run_training(cfg, run_dir).last_checkpoint


class NoiseEncoder(torch.nn.Module):
    """Latents of the right shape that ignore the image: tokens without image structure."""

    def __init__(self, encoder: torch.nn.Module, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape[0], self.num_tokens, self.dim, generator=self.generator) * 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="module")
def demo_probe(demo_ckpt, sample_urls, cache_dir) -> dict:
    """The first probe of the demo tokenizer (it encodes both sets into ``cache_dir``)."""
    train, val = sample_urls
    return probe_tokenizer(demo_ckpt, train, val, out_dir=cache_dir.parent / "demo-probe", cache_dir=cache_dir, **PROBE)


def test_ar_bits_fall_below_unigram_and_the_cache_is_reused(demo_ckpt, demo_probe, sample_urls, cache_dir, tmp_path, monkeypatch):
    train, val = sample_urls
    first = demo_probe
    out = Path(first["files"]["json"]).parent
    full = first["rows"][-1]
    assert full["num_tokens"] == 8 and [r["num_tokens"] for r in first["rows"]] == [1, 2, 4, 8]  # several prefixes
    assert full["ar_bits_per_token"] < full["unigram_bits_per_token"] - 0.3, full
    assert full["unigram_bits_per_token"] < full["codebook_bits_per_token"] == pytest.approx(math.log2(45))
    assert full["ar_bits_per_image"] == pytest.approx(full["ar_bits_per_token"] * 8)
    # prefix rows are sums of the same per-position NLL
    assert first["rows"][1]["ar_bits_per_image"] == pytest.approx(sum(first["bits_per_position"][:2]))
    assert not first["cache"]["train"]["reused"] and not first["cache"]["val"]["reused"]
    written = json.loads((out / "probe.json").read_text())
    assert written["rows"] == first["rows"] and written["settings"]["model"] == "tiny"
    assert (out / "probe.csv").read_text().startswith("num_tokens,ar_bits_per_token")
    assert (out / "samples.png").is_file()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the second probe encoded images")

    monkeypatch.setattr(probe_lib, "encode_source", no_encoding)
    second = probe_tokenizer(demo_ckpt, train, val, out_dir=tmp_path / "b", cache_dir=cache_dir, **PROBE)
    assert second["cache"]["train"]["reused"] and second["cache"]["val"]["reused"]
    assert any("reused the cached tokens" in note for note in second["notes"])
    same = [row["ar_bits_per_image"] for row in second["rows"]]
    assert same == pytest.approx([row["ar_bits_per_image"] for row in first["rows"]])  # same tokens and seed: the same probe


def test_a_noise_encoder_is_told_apart(demo_ckpt, demo_probe, sample_urls, tmp_path):
    train, val = sample_urls
    real = demo_probe["rows"][-1]
    tokenizer = load(demo_ckpt)
    tokenizer.encoder = NoiseEncoder(tokenizer.encoder, tokenizer.max_tokens, tokenizer.token_dim)
    noise = probe_tokenizer(tokenizer, train, val, out_dir=tmp_path / "noise", cache_dir=tmp_path / "cache", **PROBE)["rows"][-1]
    # noise tokens are i.i.d.: an AR model gains nothing over their unigram entropy
    print(f"gain over unigram: demo {real['gain_bits_per_token']:.3f}, noise {noise['gain_bits_per_token']:.3f} bits/token")
    assert noise["gain_bits_per_token"] < 0.1, noise
    assert real["gain_bits_per_token"] > noise["gain_bits_per_token"] + 0.3, (real, noise)


def test_subcode_sizes_and_a_factorised_distribution_sums_to_one():
    assert subcode_sizes(2**18, 4096) == [512, 512]
    assert subcode_sizes(1000, 4096) == [1000]
    radices = subcode_sizes(64000, 4096)
    assert math.prod(radices) >= 64000 and max(radices) <= 4096
    model = ARProbe(64, seq_len=3, max_subcode=8).eval()  # 64 ids as two digits of 8
    assert model.radices == [8, 8]
    ids = torch.arange(64)
    assert torch.equal(model.join(model.split(ids)), ids)
    context = torch.tensor([5, 17])
    tokens = torch.cat([context.expand(64, 2), ids[:, None]], dim=1)
    with torch.no_grad():
        prob = model.nll(tokens)[:, 2].neg().exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-5)  # a proper distribution over all 64 ids


def test_the_factorised_head_probes_an_lfq_tokenizer_of_2_18_codes(sample_urls, tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(image_size=16, num_tokens=4, quantizer={"_target_": "vistok.tokenizers.quantizers.LFQ", "dim": 18}).eval()
    assert tokenizer.codebook_size == 2**18
    train, val = sample_urls
    report = probe_tokenizer(tokenizer, train, val, out_dir=tmp_path / "lfq", cache_dir=tmp_path / "cache",
                             **{**PROBE, "steps": 60, "num_samples": 2})
    assert report["settings"]["radices"] == [512, 512]
    row = report["rows"][-1]
    assert row["codebook_bits_per_token"] == 18.0
    assert 0 < row["ar_bits_per_token"] < 18.0 + 2  # learned something of the 2^18-way distribution, finitely
    model = ARProbe(2**18, seq_len=4)
    widest = max(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    tables = max(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert widest <= 4096 and tables <= 4096  # never a 2^18-way softmax or embedding table


def test_class_labels_make_the_probe_conditional_with_a_linear_probe(tmp_path):
    import webdataset as wds

    from vistok.data.shards import encode_image
    from vistok.data.images import to_pil

    generator = torch.Generator().manual_seed(0)

    def write(path: Path, n: int) -> str:
        with wds.TarWriter(str(path)) as sink:
            for i in range(n):
                label = i % 2  # dark or bright images
                image = (torch.rand(3, 16, 16, generator=generator) * 0.3 + 0.65 * label).clamp(0, 1)
                ext, data = encode_image(to_pil(image), "png")
                sink.write({"__key__": f"{i:05d}", ext: data, "cls": str(label)})
        return str(path)

    train, val = write(tmp_path / "train.tar", 64), write(tmp_path / "val.tar", 32)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(image_size=16, num_tokens=4).eval()
    inception = FIDInceptionV3(None, features=64)  # randomly initialised: checks the gFID path, not its value
    report = probe_tokenizer(tokenizer, train, val, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                             **{**PROBE, "steps": 50, "num_samples": 4, "inception_weights": inception})
    assert report["data"]["conditional"] and report["data"]["num_classes"] == 2
    assert report["samples"]["gfid_real_images"] == 32 and math.isfinite(report["gfid"]) and report["gfid"] > 0
    linear = report["linear_probe"]
    assert linear["majority_class_accuracy"] == 0.5
    assert linear["accuracy"] >= 0.9  # brightness is in the tokens, so in the AR model's features


def test_sampling_with_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = ARProbe(300, seq_len=5, num_classes=3, max_subcode=16).eval()
    a = model.sample(3, torch.tensor([0, 1, 3]), top_k=1, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, torch.tensor([0, 1, 3]), top_k=1, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 5) and torch.equal(a, b) and int(a.max()) < 300


def test_soft_tokens_are_refused():
    tokenizer = build_tokenizer(image_size=16, num_tokens=4, quantizer={"_target_": "vistok.tokenizers.quantizers.SoftVQ", "dim": 4, "codebook_size": 8})
    assert tokenizer.codebook_size is None
    with pytest.raises(VistokError, match="discrete tokens"):
        probe_tokenizer(tokenizer, "unused", "unused")


def test_the_command_prints_the_table(demo_ckpt, sample_urls, tmp_path, capsys):
    train, val = sample_urls
    argv = ["probe", str(demo_ckpt), "--train", train, "--val", val, "--steps", "5", "--samples", "0", "--limit", "32",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--set", "logger=none",
            "--set", "trainer.enable_progress_bar=false"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "AR probe (tiny" in out and "5 steps" in out and "ar_bits_per_token" in out and "unigram_bits_per_token" in out
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["data"]["train_images"] == 32


def test_bad_input_is_one_sentence_and_exit_2(demo_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(probe_lib, "encode_source", None)  # every refusal comes before any encoding
    common = ["probe", str(demo_ckpt), "--train", "sample", "--val", "sample", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    for extra, words in ((["--model", "huge"], "not a probe size"), (["--steps", "0"], "positive whole number"),
                         (["--set", "optim.nope=1"], "bad probe setting"), (["--set", "probe.width=63"], "not divisible"),
                         (["--temperature", "0"], "--temperature must be a positive number")):
        assert cli_main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli_main(["probe", str(tmp_path / "missing"), "--train", "x", "--val", "y"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_continues_the_probe_in_its_folder(demo_ckpt, demo_probe, sample_urls, cache_dir):
    train, val = sample_urls
    out = Path(demo_probe["files"]["json"]).parent
    with pytest.raises(VistokError, match="already holds a trained probe; pass --resume"):
        probe_tokenizer(demo_ckpt, train, val, out_dir=out, cache_dir=cache_dir, **PROBE)
    again = probe_tokenizer(demo_ckpt, train, val, out_dir=out, cache_dir=cache_dir, resume=True, **PROBE)
    assert again["settings"]["steps_trained"] == demo_probe["settings"]["steps_trained"] == 200  # finished: evaluated only
    assert [r["ar_bits_per_image"] for r in again["rows"]] == pytest.approx([r["ar_bits_per_image"] for r in demo_probe["rows"]])
