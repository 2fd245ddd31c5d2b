"""data/: image loading, shard writing, the shard reader (train/val, ranks, workers), the
embedded default and `vistok shards`. Tiny images, seeded, CPU only, at most 2 workers."""
from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import vistok.cli as vistok_cli
from vistok.data import sample as sample_mod
from vistok.data.datamodule import (
    EpochResampledShards,
    SampleDataModule,
    SharedEpoch,
    ShardDataModule,
    TrainTransform,
    _draft,
    make_train_loader,
    make_val_loader,
    random_resized_box,
    split_by_rank,
)
from vistok.data.images import list_images, load_rgb, resize_center_crop, to_pil, to_tensor
from vistok.data.sample import VAL_PHOTOS, build_sample_shards, sample_shard_urls
from vistok.data.shards import encode_image, expand_shard_urls, read_index, write_shards
from vistok.data.sources import iter_image_source
from vistok.tokenizers.errors import VistokError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def smooth_image(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """A smooth colour gradient with mild noise: JPEG q95 keeps it within a few levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, size=channels)
    planes = [127 + 100 * np.sin(x / width * 3 + y / height * 2 + p) for p in phase]
    image = np.stack(planes, axis=-1) + rng.normal(0, 2, size=(height, width, channels))
    return np.clip(image, 0, 255).astype(np.uint8)


def png16(array: np.ndarray) -> bytes:
    """Encode an (H, W, C) uint16 array as a 16-bit PNG (Pillow cannot write 16-bit RGB)."""
    height, width, channels = array.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def make_source_folder(root: Path) -> dict[str, Path]:
    """Nested folder of png/jpg/webp images incl. RGBA, grayscale and 16-bit; returns key -> file."""
    files: dict[str, Path] = {}

    def put(relative: str, writer) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        files[relative] = path

    put("a/rgb.jpg", lambda p: p.write_bytes(jpeg_bytes(smooth_image(20, 24, 0))))
    put("a/b/rgba.png", lambda p: Image.fromarray(smooth_image(18, 16, 1, channels=4)).save(p))
    put("a/b/gray.png", lambda p: Image.fromarray(smooth_image(16, 20, 2)[:, :, 0], "L").save(p))
    put("c/photo.webp", lambda p: Image.fromarray(smooth_image(24, 18, 3)).save(p, "WEBP", lossless=True))
    put("c/deep16.png", lambda p: p.write_bytes(png16(smooth_image(16, 16, 4).astype(np.uint16) * 257)))
    gray16 = smooth_image(16, 16, 5)[:, :, 0].astype(np.uint16) * 257
    put("c/gray16.png", lambda p: Image.fromarray(gray16).save(p))
    put("top.v2.png", lambda p: Image.fromarray(smooth_image(16, 16, 6)).save(p))
    return files


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def make_shards(folder: Path, counts: list[int], size: int = 16, prefix: str = "s") -> list[str]:
    """Shards with the given numbers of small JPEG samples; keys are unique across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    n = 0
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            _, data = encode_image(Image.fromarray(smooth_image(size, size + 4, n)))
            samples.append({"__key__": f"{prefix}{n:04d}", "jpg": data})
            n += 1
        path = folder / f"shard-{shard:06d}.tar"
        write_tar(path, samples)
        urls.append(str(path))
    return urls


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


# ----------------------------------------------------------------------------- images


def test_load_rgb_converts_every_mode_to_rgb():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = np.asarray(load_rgb(_png(Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)  # alpha over white

    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert tuple(np.asarray(load_rgb(_png(la)))[0, 0]) == (255, 255, 255)

    gray = np.asarray(load_rgb(_png(Image.fromarray(np.full((4, 4), 77, np.uint8), "L"))))
    assert gray.shape == (4, 4, 3) and (gray == 77).all()

    sixteen = np.array([[0, 32768], [65535, 257]], np.uint16)
    out16 = np.asarray(load_rgb(_png(Image.fromarray(sixteen))))[..., 0]
    assert out16.tolist() == [[0, 128], [255, 1]]  # scaled, not truncated to the low byte

    rgb16 = smooth_image(8, 8, 1).astype(np.uint16) * 257
    assert np.abs(np.asarray(load_rgb(png16(rgb16))).astype(int) - rgb16 // 257).max() <= 1

    cmyk = io.BytesIO()
    Image.fromarray(smooth_image(8, 8, 2)).convert("CMYK").save(cmyk, "JPEG")
    assert load_rgb(cmyk.getvalue()).mode == "RGB"

    palette = Image.fromarray(smooth_image(8, 8, 3)).convert("P")
    palette.info["transparency"] = 0
    assert load_rgb(_png(palette)).mode == "RGB"


def test_load_rgb_applies_exif_orientation_and_rejects_bad_data():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = jpeg_bytes(smooth_image(10, 20, 0), exif=exif)
    assert load_rgb(data).size == (10, 20)  # stored 20x10, shown upright as 10x20
    with pytest.raises(Exception):
        load_rgb(b"not an image")
    with pytest.raises(OSError):
        load_rgb(jpeg_bytes(smooth_image(32, 32, 0))[:300])


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def test_resize_center_crop_tensor_round_trip():
    img = Image.fromarray(smooth_image(10, 30, 0))
    out = resize_center_crop(img, 16)  # small image: resized up, never rejected
    assert out.size == (16, 16)
    tensor = to_tensor(out)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert np.array_equal(np.asarray(to_pil(tensor)), np.asarray(out))


def test_iter_image_source_folder_file_shards_and_errors(tmp_path):
    files = make_source_folder(tmp_path / "src")
    names = [name for name, _ in iter_image_source(str(tmp_path / "src"), 16)]
    assert names == sorted(Path(r).with_suffix("").as_posix() for r in files)
    name, image = next(iter_image_source(str(files["a/rgb.jpg"]), None))
    assert name == "rgb" and image.shape == (3, 20, 24)
    assert len(list(iter_image_source(str(tmp_path / "src"), 8, limit=2))) == 2

    urls = make_shards(tmp_path / "shards", [2, 3])
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    from_pattern = [name for name, _ in iter_image_source(pattern, 8)]
    from_folder = [name for name, _ in iter_image_source(str(tmp_path / "shards"), 8)]
    assert from_pattern == from_folder == [f"s{i:04d}" for i in range(5)] and len(urls) == 2

    with pytest.raises(VistokError, match="does not exist"):
        list(iter_image_source(str(tmp_path / "missing"), 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VistokError, match="no images"):
        list(iter_image_source(str(tmp_path / "empty"), 16))


# ----------------------------------------------------------------------------- writing shards


def test_shards_round_trip_same_pixels_and_deterministic(tmp_path):
    files = make_source_folder(tmp_path / "src")
    index = write_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=3, workers=0)
    assert index["total"] == len(files) and index["skipped"]["count"] == 0
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["pattern"] == "shard-{000000..000002}.tar" and read_index(tmp_path / "out") == index
    assert index["image_sizes"]["source"]["max_width"] == 24
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]

    read = dict(iter_image_source(str(tmp_path / "out" / index["pattern"]), None))
    expected_keys = {Path(r).with_suffix("").as_posix().replace(".", "_") for r in files}
    assert set(read) == expected_keys  # dots in names become "_" (webdataset splits at dots)
    for relative, path in files.items():
        original = to_tensor(load_rgb(path))
        stored = read[Path(relative).with_suffix("").as_posix().replace(".", "_")]
        assert stored.shape == original.shape
        difference = (stored - original).abs()
        if relative.endswith(".jpg"):
            assert float(difference.max()) == 0.0  # JPEG sources are stored byte for byte
        else:
            assert float(difference.mean()) < 0.01 and float(difference.max()) < 0.1  # JPEG q95, 4:4:4

    again = write_shards(tmp_path / "src", tmp_path / "again", samples_per_shard=3, workers=2)
    assert again["shards"] == index["shards"]
    for shard in index["shards"]:
        first = (tmp_path / "out" / shard["name"]).read_bytes()
        assert first == (tmp_path / "again" / shard["name"]).read_bytes()  # same input, same bytes


def test_shards_resize_and_max_size_options(tmp_path):
    make_source_folder(tmp_path / "src")
    index = write_shards(tmp_path / "src", tmp_path / "resized", resize=12, workers=0)
    assert index["image_sizes"]["stored"]["most_common"] == {"12x12": 7}
    index = write_shards(tmp_path / "src", tmp_path / "capped", max_size=18, image_format="png", workers=0)
    stored = index["image_sizes"]["stored"]
    assert max(stored["max_width"], stored["max_height"]) <= 18
    with pytest.raises(VistokError, match="exclude"):
        write_shards(tmp_path / "src", tmp_path / "both", max_size=8, resize=8, workers=0)


def test_corrupted_source_files_are_skipped_and_counted(tmp_path, caplog):
    src = tmp_path / "src"
    make_source_folder(src)
    (src / "bad").mkdir()
    (src / "bad" / "garbage.jpg").write_bytes(b"this is not an image")
    (src / "bad" / "truncated.jpg").write_bytes(jpeg_bytes(smooth_image(32, 32, 9))[:400])
    (src / "bad" / "truncated.png").write_bytes(_png(Image.fromarray(smooth_image(32, 32, 9)))[:200])
    with caplog.at_level(logging.WARNING):
        index = write_shards(src, tmp_path / "out", workers=0)
    assert index["total"] == 7
    assert index["skipped"]["count"] == 3
    assert sorted(f["path"] for f in index["skipped"]["files"]) == [
        "bad/garbage.jpg", "bad/truncated.jpg", "bad/truncated.png"
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all(w.startswith("skipped bad/") for w in warnings)


def test_write_refuses_to_mix_with_existing_shards(tmp_path):
    make_source_folder(tmp_path / "src")
    write_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=2, workers=0)
    with pytest.raises(VistokError, match="--overwrite"):
        write_shards(tmp_path / "src", tmp_path / "out", workers=0)
    index = write_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=100, workers=0, overwrite=True)
    assert index["num_shards"] == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.tar")) == ["shard-000000.tar"]


# ----------------------------------------------------------------------------- reading shards


def test_corrupted_member_inside_a_shard_is_skipped_and_counted(tmp_path):
    urls = make_shards(tmp_path / "shards", [3])
    good = jpeg_bytes(smooth_image(16, 16, 1))
    write_tar(
        tmp_path / "shards" / "shard-000001.tar",
        [
            {"__key__": "ok1", "jpg": good},
            {"__key__": "garbage", "jpg": b"definitely not a jpeg"},
            {"__key__": "truncated", "jpg": good[: len(good) // 2]},
            {"__key__": "ok2", "png": _png(Image.fromarray(smooth_image(12, 12, 2)))},
        ],
    )
    (tmp_path / "shards" / "shard-000002.tar").write_bytes(b"not a tar file at all" * 10)
    urls += [str(tmp_path / "shards" / f"shard-00000{i}.tar") for i in (1, 2)]

    batches = list(make_val_loader(urls, image_size=8, batch_size=2, num_workers=0))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == ["ok1", "ok2", "s0000", "s0001", "s0002"]
    assert sum(int(b["num_skipped"]) for b in batches) >= 3  # 2 bad members + the broken shard

    loader = make_train_loader(urls, image_size=8, batch_size=2, batches_per_epoch=6, shuffle_buffer_size=4)
    batches = list(loader)
    assert len(batches) == 6 and all(b["image"].shape == (2, 3, 8, 8) for b in batches)
    assert sum(int(b["num_skipped"]) for b in batches) > 0


def _shards_with_bad_samples(folder: Path) -> list[str]:
    urls = make_shards(folder, [3])
    good = jpeg_bytes(smooth_image(16, 16, 1))
    bad = folder / "shard-000001.tar"
    write_tar(bad, [{"__key__": "ok1", "jpg": good}, {"__key__": "garbage", "jpg": b"not a jpeg"},
                    {"__key__": "truncated", "jpg": good[: len(good) // 2]}])
    return urls + [str(bad)]


def test_skip_warnings_name_the_shard_and_the_key_and_training_batches_count_them(tmp_path, caplog):
    urls = _shards_with_bad_samples(tmp_path / "shards")
    with caplog.at_level(logging.WARNING):
        list(make_val_loader(urls, image_size=8, batch_size=2))
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert [w.split(":")[0] for w in warnings] == [
        f"skipped sample 'garbage' in {urls[1]}", f"skipped sample 'truncated' in {urls[1]}"]

    loader = make_train_loader(urls, image_size=8, batch_size=2, batches_per_epoch=8, shuffle_buffer_size=0)
    batches = list(loader)
    running = [b["skipped_total"] for b in batches]
    assert running == list(np.cumsum([int(b["num_skipped"]) for b in batches]))
    assert running[-1] == loader.num_skipped > 0


def test_the_training_module_logs_the_running_skip_count_with_the_metrics(tmp_path):
    """train/num_skipped (running total) and val/num_skipped reach the CSV log, as they reach wandb."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from vistok.tokenizers.training.module import TokenizerModule

    urls = _shards_with_bad_samples(tmp_path / "shards")
    tokenizer = {"arch": "titok", "preset": "tiny", "image_size": 8, "num_tokens": 2, "patch_size": 4, "width": 16,
                 "depth": 1, "heads": 2, "quantizer": {"_target_": "vistok.tokenizers.quantizers.FSQ", "levels": [5, 5]}}
    module = TokenizerModule(tokenizer, optim={"lr": 1e-3, "warmup_steps": 1}, validation={"grid_images": 0})
    dm = ShardDataModule(urls, urls, image_size=8, batch_size=2, num_workers=0, batches_per_epoch=4, shuffle_buffer=0)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path / "logs", name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    with open(tmp_path / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    running = [float(r["train/num_skipped"]) for r in rows if r.get("train/num_skipped")]
    assert len(running) == 4 and running == sorted(running) and running[-1] == trainer.train_dataloader.num_skipped > 0
    assert [float(r["val/num_skipped"]) for r in rows if r.get("val/num_skipped")] == [2.0]  # garbage + truncated


def test_validation_sees_every_sample_once_across_workers_and_ranks(tmp_path):
    urls = make_shards(tmp_path / "shards", [5, 2, 4, 3, 1, 6])
    everything = sorted(f"s{i:04d}" for i in range(21))
    assert sorted(keys_of(make_val_loader(urls, image_size=8, batch_size=4, num_workers=2))) == everything
    per_rank = [
        keys_of(make_val_loader(urls, image_size=8, batch_size=4, num_workers=2, rank=r, world_size=2))
        for r in range(2)
    ]
    assert sorted(per_rank[0] + per_rank[1]) == everything
    assert set(per_rank[0]).isdisjoint(per_rank[1])


def test_validation_with_fewer_shards_than_ranks_and_workers(tmp_path, caplog):
    urls = make_shards(tmp_path / "shards", [7])
    with caplog.at_level(logging.WARNING):
        per_rank = [
            keys_of(make_val_loader(urls, image_size=8, batch_size=2, num_workers=2, rank=r, world_size=3))
            for r in range(3)
        ]
    assert sorted(k for keys in per_rank for k in keys) == [f"s{i:04d}" for i in range(7)]
    assert [len(keys) for keys in per_rank] == [3, 2, 2]  # samples, not shards, are split
    assert any("using 1 worker" in r.getMessage() for r in caplog.records)


def test_two_ranks_get_the_same_number_of_training_batches_with_uneven_shards(tmp_path):
    urls = make_shards(tmp_path / "shards", [7, 1, 3])
    for epoch in range(2):
        counts = []
        for rank, workers in ((0, 2), (1, 1)):
            loader = make_train_loader(
                urls, image_size=8, batch_size=3, batches_per_epoch=5, num_workers=workers,
                rank=rank, world_size=2, shuffle_buffer_size=4, epoch_source=lambda: epoch,
            )
            batches = list(loader)
            assert all(b["image"].shape == (3, 3, 8, 8) for b in batches)
            assert 0.0 <= float(batches[0]["image"].min()) and float(batches[0]["image"].max()) <= 1.0
            counts.append(len(batches))
            assert len(loader) == 5
        assert counts == [5, 5]


def test_each_rank_reads_its_own_slice_of_the_shared_training_shard_sequence(tmp_path):
    """One sample per shard and no shuffling, so the keys show the shard order: a single process reads
    the resampled sequence S; rank 0 of 2 reads S[0], S[2], ... and rank 1 S[1], S[3], ... Ranks that
    skipped the split would both read S, identical samples, and fail here."""
    urls = make_shards(tmp_path / "shards", [1] * 8)

    def keys(rank: int, world_size: int, n: int) -> list[str]:
        loader = make_train_loader(urls, image_size=8, batch_size=1, batches_per_epoch=n, rank=rank,
                                   world_size=world_size, shuffle_buffer_size=0, hflip=False, seed=3)
        return keys_of(loader)

    sequence = keys(0, 1, 12)
    assert len(set(sequence)) > 1
    assert keys(0, 2, 6) == sequence[0::2] and keys(1, 2, 6) == sequence[1::2]


def test_training_shard_sequence_is_shared_by_ranks_and_changes_per_epoch():
    urls = [f"shard-{i}.tar" for i in range(10)]

    def sequence(epoch: int, n: int = 40) -> list[str]:
        stream = iter(EpochResampledShards(urls, seed=3, epoch=SharedEpoch(epoch)))
        return [next(stream)["url"] for _ in range(n)]

    assert sequence(0) == sequence(0)  # what every rank computes before its split
    assert sequence(0) != sequence(1)
    rank0 = list(split_by_rank(sequence(0), 0, 2))
    rank1 = list(split_by_rank(sequence(0), 1, 2))
    assert rank0 == sequence(0)[0::2] and rank1 == sequence(0)[1::2]


def test_fewer_shards_than_workers_does_not_crash(tmp_path):
    urls = make_shards(tmp_path / "shards", [5])
    train = make_train_loader(urls, image_size=8, batch_size=2, batches_per_epoch=3, num_workers=2)
    assert len(list(train)) == 3
    assert sorted(keys_of(make_val_loader(urls, image_size=8, batch_size=2, num_workers=2))) == [
        f"s{i:04d}" for i in range(5)
    ]


def test_epochs_differ_and_persistent_workers_see_the_epoch(tmp_path):
    urls = make_shards(tmp_path / "shards", [6, 6])
    loader = make_train_loader(
        urls, image_size=8, batch_size=4, batches_per_epoch=3, num_workers=1, persistent_workers=True,
        shuffle_buffer_size=8,
    )
    first, second = keys_of(loader), keys_of(loader)
    assert loader.shared_epoch.get() == 1 and first != second
    replay = make_train_loader(urls, image_size=8, batch_size=4, batches_per_epoch=3, shuffle_buffer_size=8)
    assert keys_of(replay) == first  # seeded: the same settings replay the same epoch 0


def test_a_run_resumed_part_way_through_an_epoch_reads_new_batches_not_a_replay(tmp_path):
    urls = make_shards(tmp_path / "shards", [6, 6])

    def loader():
        return make_train_loader(urls, image_size=8, batch_size=2, batches_per_epoch=6, shuffle_buffer_size=8,
                                 epoch_source=lambda: 0)

    interrupted = loader()
    stream = iter(interrupted)
    trained = [next(stream)["image"] for _ in range(3)]
    state = interrupted.state_dict()  # what Lightning saves with a checkpoint
    assert state == {"epoch": 0, "batches": 3}

    def resumed_from(state: dict) -> tuple[list[torch.Tensor], dict]:
        resumed = loader()
        resumed.load_state_dict(state)
        return [batch["image"] for batch in resumed], resumed.state_dict()

    rest, after = resumed_from(state)
    assert not any(torch.equal(new, old) for new in rest for old in trained)
    assert after == {"epoch": 0, "batches": 3 + len(rest)}  # a second interruption seeds differently again
    again, _ = resumed_from(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))  # seeded: resuming is reproducible
    # a checkpoint from the end of an epoch (the trainer has moved to the next one) changes nothing
    other, _ = resumed_from({"epoch": 7, "batches": 6})
    fresh = [batch["image"] for batch in loader()]
    assert all(torch.equal(a, b) for a, b in zip(other, fresh, strict=True)) and torch.equal(fresh[0], trained[0])


def test_train_transform_draft_decoding_matches_full_decoding():
    data = jpeg_bytes(smooth_image(256, 320, 0))
    img = Image.open(io.BytesIO(data))
    box = _draft(img, (0, 0, 256, 256), 32)
    assert img.size == (40, 32) and box == (0, 0, 32, 32)  # decoded at 1/8 scale
    fast = TrainTransform(32, crop="center", hflip=False)(data, None)
    exact = np.asarray(resize_center_crop(load_rgb(data), 32))
    assert fast.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 3


def test_random_resized_box_follows_torchvision_semantics():
    import random

    rng = random.Random(0)
    for _ in range(50):
        left, top, right, bottom = random_resized_box(40, 30, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert (right - left) * (bottom - top) >= 0.5 * 40 * 30 * 0.9


# ----------------------------------------------------------------------------- the data module


def test_settings_are_checked_with_one_sentence(tmp_path):
    urls = make_shards(tmp_path / "shards", [2])
    ok = dict(train_urls=urls[0], image_size=16, batch_size=2, num_workers=0)
    ShardDataModule(**ok).validate(multiple_of=8)
    cases = [
        (dict(ok, train_urls=str(tmp_path / "nothing-{000000..000003}.tar")), None, "data.train_urls"),
        (dict(ok, train_urls=str(tmp_path / "shards" / "shard-{000000..000003}.tar")), None, "3 of 4"),
        (dict(ok, val_urls=str(tmp_path / "*.tar")), None, "data.val_urls"),
        (dict(ok, batch_size=0), None, "data.batch_size"),
        (dict(ok, image_size=30), 16, "data.image_size=30"),
        (dict(ok, crop="zoom"), None, "data.crop"),
        (dict(ok, scale=(0.9, 0.2)), None, "data.scale"),
        (dict(ok, train_urls=None), None, "data.train_urls"),
    ]
    for kwargs, multiple_of, needle in cases:
        with pytest.raises(VistokError, match=needle) as error:
            ShardDataModule(**kwargs).validate(multiple_of=multiple_of)
        assert "\n" not in str(error.value)
    assert expand_shard_urls(str(tmp_path / "shards" / "*.tar")) == urls


def test_datamodule_under_lightning_runs_fixed_epochs_and_full_validation(tmp_path):
    import lightning as L

    train_urls = make_shards(tmp_path / "train", [5, 2, 4])
    val_urls = make_shards(tmp_path / "val", [3, 2], prefix="v")

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Conv2d(3, 3, 1)
            self.train_steps = 0
            self.val_keys: list[str] = []

        def training_step(self, batch, batch_idx):
            self.train_steps += 1
            self.log("data/decode_errors", batch["num_skipped"].float(), reduce_fx="sum", on_epoch=True)
            return (self.layer(batch["image"]) - batch["image"]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.val_keys.extend(batch["key"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = ShardDataModule(train_urls, val_urls, image_size=8, batch_size=2, num_workers=1, batches_per_epoch=3)
    probe = Probe()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.train_steps == 6 and trainer.global_step == 6
    assert Counter(probe.val_keys) == Counter({f"v{i:04d}": 2 for i in range(5)})  # once per validation
    assert trainer.train_dataloader.shared_epoch.get() == 1  # the trainer's epoch reached the workers


# ----------------------------------------------------------------------------- embedded default


@pytest.fixture(scope="module")
def sample_settings(tmp_path_factory):
    return dict(data_dir=str(tmp_path_factory.mktemp("vistok-data")), crops_per_photo=2, val_crops_per_photo=1)


def test_embedded_default_builds_once_and_is_reused(sample_settings, monkeypatch):
    folder = build_sample_shards(16, **sample_settings)
    train_urls, val_urls = sample_shard_urls(16, **sample_settings)
    assert len(train_urls) == 15 and len(val_urls) == 4  # 30 train / 4 val crops, <= 16 / 8 shards
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("the embedded dataset was rebuilt")

    monkeypatch.setattr(sample_mod, "write_samples", must_not_run)
    assert build_sample_shards(16, **sample_settings) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    val_photos = {key.split("/")[0] for url in val_urls for key, _ in iter_image_source(url, None)}
    train_photos = {key.split("/")[0] for url in train_urls for key, _ in iter_image_source(url, None)}
    assert val_photos <= set(VAL_PHOTOS) and train_photos.isdisjoint(VAL_PHOTOS)  # whole photos held out
    manifest = json.loads((folder / "sample.json").read_text())
    assert len(manifest["train"]["photos"]) == 15 and manifest["val"]["photos"] == list(VAL_PHOTOS)


def test_sample_datamodule_uses_the_shard_reader(sample_settings, monkeypatch):
    monkeypatch.setenv("VISTOK_DATA_DIR", sample_settings["data_dir"])
    dm = SampleDataModule(
        image_size=16, batch_size=4, num_workers=0, batches_per_epoch=2, shuffle_buffer=8,
        crops_per_photo=2, val_crops_per_photo=1,
    )
    dm.validate(multiple_of=8)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 3, 16, 16)
    assert sorted(k.split("/")[0] for k in keys_of(dm.val_dataloader())) == sorted(VAL_PHOTOS)
    with pytest.raises(VistokError, match="data.image_size=16"):
        dm.validate(multiple_of=5)
    names = [name for name, _ in iter_image_source("sample", 16)]
    assert len(names) > 0 and all(n.split("/")[0] in VAL_PHOTOS for n in names)


def test_sample_datamodule_takes_the_shard_settings_with_its_own_defaults():
    dm = SampleDataModule(image_size=16, crop="center")
    assert (dm.num_workers, dm.shuffle_buffer, dm.batches_per_epoch) == (2, 500, 500)  # CPU-sized defaults
    assert (dm.image_size, dm.crop, dm.batch_size) == (16, "center", 32)  # the rest from ShardDataModule
    with pytest.raises(VistokError, match="train_urls cannot be set; use data=webdataset"):
        SampleDataModule(train_urls="shards/shard-000000.tar")


# ----------------------------------------------------------------------------- command line


def test_vistok_shards_command(tmp_path, capsys):
    make_source_folder(tmp_path / "src")
    out = tmp_path / "out"
    code = vistok_cli.main(["shards", str(tmp_path / "src"), str(out), "--samples-per-shard", "4", "--workers", "0"])
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 7 and index["num_shards"] == 2
    assert "wrote 7 images in 2 shards" in capsys.readouterr().out

    code = vistok_cli.main(["shards", str(tmp_path / "missing"), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vistok shards: error: ") and err.count("\n") == 1
    assert vistok_cli.main(["shards", str(tmp_path / "src"), str(out)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_vistok_shards_holds_out_a_deterministic_validation_split(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(8, 8, i)).save(src / f"d{i % 3}" / f"img{i:02d}.png")
    out = tmp_path / "out"
    argv = ["shards", str(src), str(out), "--val-fraction", "0.1", "--samples-per-shard", "8", "--workers", "0"]
    assert vistok_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote 36 images in 5 shards to {out}/train/shard-{{000000..000004}}.tar" in printed
    assert f"wrote 4 images in 1 shards to {out}/val/shard-{{000000..000000}}.tar" in printed
    train, val = read_index(out / "train"), read_index(out / "val")
    assert (train["total"], val["total"]) == (36, 4) and val["split"]["name"] == "val"
    assert not (out / "index.json").exists() and not list(out.glob("*.tar"))
    train_keys = {k for k, _ in iter_image_source(str(out / "train"), None)}
    val_keys = {k for k, _ in iter_image_source(str(out / "val"), None)}
    assert len(train_keys | val_keys) == 40 and train_keys.isdisjoint(val_keys)

    # The split depends on the names only: listed in another order, it is the same.
    from vistok.data.shards import split_files

    names = sorted(f"{p.parent.name}/{p.name}" for p in src.rglob("*.png"))
    _, held_out = split_files(names, 0.1)
    assert split_files(names[::-1], 0.1)[1] == held_out[::-1]
    assert {Path(n).with_suffix("").as_posix() for n in held_out} == val_keys
    assert vistok_cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse's refusal, like every other bad flag value
        vistok_cli.main(["shards", str(src), str(tmp_path / "x"), "--val-fraction", "1.5"])
    assert refused.value.code == 2 and "expected a number between 0 and 1" in capsys.readouterr().err


def test_vistok_shards_labels_each_image_by_its_class_folder(tmp_path, capsys):
    from vistok.data.shards import read_labeled_shard_samples

    src = tmp_path / "src"
    classes = ["dog", "cat", "zebra"]
    for i in range(30):
        (src / classes[i % 3] / "sub").mkdir(parents=True, exist_ok=True)  # nested: the top-level folder counts
        Image.fromarray(smooth_image(8, 8, i)).save(src / classes[i % 3] / "sub" / f"img{i:02d}.png")
    out = tmp_path / "out"
    argv = ["shards", str(src), str(out), "--labels", "folder", "--val-fraction", "0.2", "--workers", "0"]
    assert vistok_cli.main(argv) == 0
    for split in ("train", "val"):  # one class list for both splits, sorted as torchvision's ImageFolder
        index = read_index(out / split)
        assert index["classes"] == ["cat", "dog", "zebra"] and index["settings"]["labels"] == "folder"
        urls = [str(out / split / shard["name"]) for shard in index["shards"]]
        labelled = list(read_labeled_shard_samples(urls))
        assert len(labelled) == index["total"]
        assert all(label == index["classes"].index(key.split("/")[0]) for key, _, label in labelled)
    capsys.readouterr()

    # without --labels, no cls member; an image outside any class folder is refused in one sentence
    write_shards(src, tmp_path / "plain", workers=0)
    plain = read_index(tmp_path / "plain")
    assert "classes" not in plain and all(label is None for _, _, label in read_labeled_shard_samples(
        [str(tmp_path / "plain" / shard["name"]) for shard in plain["shards"]]))
    Image.fromarray(smooth_image(8, 8, 99)).save(src / "loose.png")
    assert vistok_cli.main(["shards", str(src), str(tmp_path / "x"), "--labels", "folder", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loose.png sits directly in the source folder; move it into a class folder" in err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def test_vistok_shards_reports_progress_as_lines_when_redirected_and_a_bar_on_a_terminal(tmp_path):
    import io

    from vistok.data.cli import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    redirected, terminal = io.StringIO(), Terminal()
    for stream in (redirected, terminal):
        progress = Progress(stream, "vistok shards: ")
        for done in range(1, 101):
            progress(done, 100)
        progress.close()
    lines = redirected.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"vistok shards: {n}/100 images" for n in range(10, 101, 10)]
    assert "\r" not in redirected.getvalue() and "100%" in lines[-1]
    assert "\r" in terminal.getvalue() and "writing shards" in terminal.getvalue() and "100/100" in terminal.getvalue()

    make_source_folder(tmp_path / "src")  # the command reports through it: 7 files, redirected stderr
    result = subprocess.run([sys.executable, "-m", "vistok", "shards", str(tmp_path / "src"), str(tmp_path / "out"),
                             "--workers", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line.split(" (")[0] for line in result.stderr.splitlines()] == [f"vistok shards: {n}/7 images" for n in range(1, 8)]


def test_vistok_shards_missing_source_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vistok", "shards", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_list_images_is_sorted_and_skips_hidden_files(tmp_path):
    make_source_folder(tmp_path)
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "._resource.png")
    relative = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert relative == sorted(relative) and len(relative) == 7
