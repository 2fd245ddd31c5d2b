"""`vistok probe` as library functions: how learnable are a tokenizer's tokens (AR probing, GigaTok)?

:func:`probe_tokenizer` encodes a training and a validation image set once (the tokens are cached
as webdataset shards keyed by tokenizer, data and token count, so a second probe skips encoding),
trains the same small causal transformer (:class:`~vistok.tokenizers.ar.ARProbe`, config group
``configs/probe/``) on the token sequences through Lightning, and writes into ``out_dir``:

- ``probe.json``: settings, tokenizer, data, token caches, one row per prefix length, samples, gFID,
  linear-probe accuracy, notes;
- ``probe.csv``: the rows (AR bits per token/image beside the unigram and log2(C) baselines);
- ``samples.png``: a grid of AR samples decoded by the tokenizer;
- ``ar/``: the probe's run directory (checkpoints, logs), which ``resume`` continues.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vistok.eval.metrics import ReconstructionEvaluator, ReconstructionFID, bits_per_token
from vistok.eval.pretrained import load_inception
from vistok.eval.rate_distortion import parse_token_counts
from vistok.eval.report import format_table, write_csv
from vistok.eval.score import batched, sized_images
from vistok.tokenizers.atomic import atomic_write_json, check_writable
from vistok.tokenizers.containers import plain
from vistok.tokenizers.device import resolve_device
from vistok.tokenizers.errors import VistokError

log = logging.getLogger(__name__)

LN2 = math.log(2)
CACHE_FORMAT = 1
ROW_FIELDS = ("num_tokens", "ar_bits_per_token", "ar_bits_per_image", "unigram_bits_per_token", "unigram_bits_per_image",
              "codebook_bits_per_token", "codebook_bits_per_image", "gain_bits_per_token")
SUMMARY_COLUMNS = ("num_tokens", "ar_bits_per_token", "unigram_bits_per_token", "codebook_bits_per_token",
                   "ar_bits_per_image", "unigram_bits_per_image", "codebook_bits_per_image")

PROTOCOL = {
    "ar": ("decoder-only causal transformer (configs/probe/<model>.yaml) trained by next-token cross-entropy on the "
           "training set's token sequences of length K; class-conditional (start embedding = class) when every image has a label"),
    "ar_bits": ("validation NLL / ln 2 under the AR model, teacher-forced, mean over images; with labels, conditioned on the "
                "true class. A prefix of k tokens scores the sum of its first k positions' NLL (exact for a causal model). "
                "select=best (default): the weights of the validation check with the fewest bits (chosen on the same "
                "validation set, so slightly optimistic); select=last: the final weights"),
    "factorised": "codebooks larger than the probe's max_subcode are predicted as mixed-radix sub-codes, one after another; "
                  "bits per token = sum of the sub-codes' NLL / ln 2",
    "unigram": "entropy (bits) of the empirical distribution of the training tokens in positions 1..k, pooled",
    "codebook": "log2(codebook size) bits per token: what the tokens cost without any model",
    "gfid": ("Frechet distance between FID Inception-v3 pool features of N decoded AR samples and of the validation images, "
             "with rFID's handling (8-bit rounding, uint8 into the 2015-12-05 graph, float64 statistics)"),
    "linear_probe": ("multinomial logistic regression (L-BFGS, L2 1e-3, standardised features) on the AR model's middle-block "
                     "output averaged over positions, computed with the 'no class' start; trained on the training set, "
                     "accuracy on the validation set"),
    "cache": "tokens cached as webdataset shards keyed by tokenizer fingerprint, data (path, and files' sizes and mtimes when local), K, image size and limit",
}


# --------------------------------------------------------------------------------------------
# Token cache


@dataclass
class TokenSet:
    """Tokens of one image set: (N, K) long, labels (N,) long or None (not every image labelled)."""

    tokens: Tensor
    labels: Tensor | None
    folder: Path
    cached: bool  # True: read from the cache, no encoding


def data_identity(source: str) -> dict[str, Any]:
    """What the token cache key knows of ``source``: the string, and for a local folder or file
    the relative names, sizes and modification times of its files (so edited data re-encodes)."""
    path = Path(source).expanduser()
    if not path.exists():
        return {"source": str(source)}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return {"source": str(path.resolve()), "files": len(files), "digest": digest.hexdigest()[:16]}


def cache_key(fingerprint: str, source: str, num_tokens: int, image_size: int, limit: int | None) -> str:
    identity = {"format": CACHE_FORMAT, "tokenizer": fingerprint, "data": data_identity(source), "num_tokens": num_tokens,
                "image_size": image_size, "limit": limit}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def encode_source(tokenizer: Any, source: str, num_tokens: int, *, limit: int | None, batch_size: int,
                  device: torch.device) -> tuple[Tensor, list[int | None]]:
    """Every image of ``source`` (resized and centre-cropped to the tokenizer's size) -> ((N, k) long tokens, labels)."""
    from vistok.data.sources import iter_labeled_images

    labels: list[int | None] = []

    def images():
        for name, image, label in iter_labeled_images(source, tokenizer.image_size, limit):
            labels.append(label)
            yield name, image

    chunks = [tokenizer.encode(batch.to(device), num_tokens).cpu() for batch in batched(images(), batch_size)]
    if not chunks:
        raise VistokError(f"{source} yielded no images; point the probe at a folder of images, shard URLs or 'sample'.")
    return torch.cat(chunks).long(), labels


def write_token_cache(folder: Path, tokens: Tensor, labels: Sequence[int | None], meta: dict[str, Any]) -> None:
    """Write tokens as webdataset shards (``tokens.npy`` int32, ``cls`` when labelled) plus meta.json
    into a temporary folder renamed to ``folder``; a folder another process finished first is kept."""
    import webdataset as wds

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with wds.ShardWriter(str(tmp / "tokens-%06d.tar"), maxcount=100_000, verbose=0) as sink:
            for i, row in enumerate(tokens.to(torch.int32).numpy()):
                sample = {"__key__": f"{i:09d}", "tokens.npy": row}
                if labels[i] is not None:
                    sample["cls"] = str(labels[i])
                sink.write(sample)
        atomic_write_json(tmp / "meta.json", meta)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_token_cache(folder: Path) -> tuple[Tensor, list[int | None]]:
    """(N, k) long tokens and labels from a cache folder written by :func:`write_token_cache`."""
    import webdataset as wds

    from vistok.data.shards import parse_label

    urls = sorted(str(p) for p in folder.glob("tokens-*.tar"))
    rows, labels = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        rows.append(np.load(io.BytesIO(sample["tokens.npy"])))
        labels.append(parse_label(sample.get("cls")))
    return torch.from_numpy(np.stack(rows)).long(), labels


def cached_tokens(tokenizer: Any, fingerprint: str, source: str, num_tokens: int, cache_dir: Path, *, limit: int | None,
                  batch_size: int, device: torch.device) -> TokenSet:
    """The tokens of ``source``: from the cache when this tokenizer, data and count were encoded before, else encoded and cached."""
    key = cache_key(fingerprint, source, num_tokens, tokenizer.image_size, limit)
    folder = cache_dir / key
    if (folder / "meta.json").is_file():
        tokens, labels = read_token_cache(folder)
        cached = True
    else:
        tokens, labels = encode_source(tokenizer, source, num_tokens, limit=limit, batch_size=batch_size, device=device)
        meta = {"tokenizer": fingerprint, "data": data_identity(source), "num_tokens": num_tokens, "images": len(tokens),
                "image_size": tokenizer.image_size, "limit": limit, "codebook_size": tokenizer.codebook_size,
                "labelled": sum(label is not None for label in labels)}
        write_token_cache(folder, tokens, labels, meta)
        cached = False
    have_all = bool(labels) and all(label is not None for label in labels)
    label_tensor = torch.tensor(labels, dtype=torch.long) if have_all else None
    return TokenSet(tokens, label_tensor, folder, cached)


# --------------------------------------------------------------------------------------------
# Baselines and evaluations


def resolve_sample(source: str, split: str, image_size: int) -> str:
    """``"sample"`` as the embedded sample's ``split`` shards (``vistok score`` reads its val split
    only; a probe trained and validated on one set would measure memorisation); others unchanged."""
    if str(source) != "sample":
        return str(source)
    from vistok.data.sample import sample_shard_urls

    train_urls, val_urls = sample_shard_urls(image_size)
    return "::".join(train_urls if split == "train" else val_urls)


def unigram_entropy(tokens: Tensor, codebook_size: int) -> float:
    """Entropy in bits of the empirical distribution of ``tokens`` (any shape, ids in [0, codebook_size))."""
    counts = torch.bincount(tokens.reshape(-1), minlength=codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log2()).sum())


@torch.no_grad()
def position_bits(model: Any, tokens: Tensor, labels: Tensor | None, batch_size: int = 256) -> Tensor:
    """Mean over sequences of the AR model's NLL in bits at each position: (L,) float64."""
    total = torch.zeros(tokens.shape[1], dtype=torch.float64)
    device = next(model.parameters()).device
    for start in range(0, len(tokens), batch_size):
        part = tokens[start:start + batch_size].to(device)
        lab = labels[start:start + batch_size].to(device) if labels is not None else None
        total += model.nll(part, lab).double().sum(0).cpu() / LN2
    return total / len(tokens)


@torch.no_grad()
def ar_features(model: Any, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """(N, W) label-blind features of the AR model (see :meth:`ARProbe.features`)."""
    device = next(model.parameters()).device
    return torch.cat([model.features(tokens[s:s + batch_size].to(device)).float().cpu() for s in range(0, len(tokens), batch_size)])


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, steps: int = 100,
                          l2: float = 1e-3, seed: int = 0) -> float:
    """Validation accuracy of multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    classes = int(max(train_y.max(), val_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(val_x).argmax(1) == val_y).double().mean())


# --------------------------------------------------------------------------------------------
# Config and training


def compose_probe_config(model: str = "tiny", steps: int | None = None, resume: bool = False,
                         overrides: Sequence[str] = (), gpu: bool = False) -> Any:
    """configs/probe_train.yaml composed with the probe size, steps, resume and ``KEY=VALUE`` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vistok.tokenizers.training.settings import CONFIG_DIR

    sizes = sorted(p.stem for p in (CONFIG_DIR / "probe").glob("*.yaml"))
    if model not in sizes:
        raise VistokError(f"--model {model!r} is not a probe size; choose one of {', '.join(sizes)}.")
    args = [f"probe={model}"]
    if gpu and not any(o.startswith("trainer=") for o in overrides):
        args.append("trainer=gpu")
    if steps is not None:
        args.append(f"trainer.max_steps={steps}")
    if resume:
        args.append("resume=auto")
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("probe_train", overrides=[*args, *overrides])
    except (HydraException, OmegaConfBaseException) as error:
        raise VistokError(f"bad probe setting ({str(error).splitlines()[0]}); see configs/probe_train.yaml for the keys.") from None


def train_probe(cfg: Any, train: TokenSet, val: TokenSet, codebook_size: int, num_classes: int, run_dir: Path) -> Any:
    """Fit the AR probe with the training plumbing (trainer/logger groups, atomic checkpoints, resume).

    Returns the trained :class:`ProbeModule` (None on DDP ranks other than 0).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vistok.tokenizers.training.probe_module import ProbeModule, TokenDataModule
    from vistok.tokenizers.training.run import build_logger, build_trainer, list_checkpoints, resolve_resume

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    unknown = sorted(set(cfg) - {"seed", "resume", "batch_size", "class_dropout", "select", "optim", "trainer", "logger", "probe"})
    if unknown:
        raise VistokError(f"unknown probe setting(s) {', '.join(unknown)}; see configs/probe_train.yaml for the keys.")
    if cfg.resume is None and run_dir.is_dir() and list_checkpoints(run_dir):
        raise VistokError(f"{run_dir} already holds a trained probe; pass --resume to continue (or re-evaluate) it, or choose another --out.")
    ckpt_path, _ = resolve_resume(cfg.resume, run_dir, tokenizer=False)
    if int(cfg.batch_size) < 1:
        raise VistokError(f"batch_size must be a positive whole number, got {cfg.batch_size}.")
    module = ProbeModule(plain(cfg.probe), codebook_size, train.tokens.shape[1], num_classes, plain(cfg.optim),
                         int(cfg.trainer.max_steps), float(cfg.class_dropout) if num_classes else 0.0)
    zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731 - unconditional: placeholder labels
    data = TokenDataModule((train.tokens, train.labels if num_classes else zeros(len(train.tokens))),
                           (val.tokens, val.labels if num_classes else zeros(len(val.tokens))), int(cfg.batch_size), int(cfg.seed))
    if cfg.select not in ("best", "last"):
        raise VistokError(f"select={cfg.select} is not known; use best (lowest validation bits) or last.")
    # best: the validated weights with the fewest bits per token (small data sets overfit a probe);
    # without any validation (max_steps below the interval) the final weights
    checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, monitor="val/bits_per_token", mode="min",
                                 save_top_k=1, filename="best-{step:07d}", auto_insert_metric_name=False)
    trainer = build_trainer(cfg, run_dir, build_logger(cfg, run_dir), [checkpoint])
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)
    final_step = trainer.global_step
    if final_step > 0:  # max_steps need not fall on a validation: last.ckpt holds the final weights for resume
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)  # resumable: optimizer too
    module.selected_step = final_step
    if cfg.select == "best" and checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        module.selected_step = int(state["global_step"])
    module.final_step = final_step
    return module if trainer.is_global_zero else None


# --------------------------------------------------------------------------------------------
# The probe


def probe_tokenizer(tokenizer: Any | str | os.PathLike, train: str, val: str, *, num_tokens: str | Sequence[int] | None = None,
                    model: str = "tiny", steps: int | None = None, out_dir: str | os.PathLike = "outputs/probe/run",
                    cache_dir: str | os.PathLike = "outputs/probe/cache", limit: int | None = None, batch_size: int = 64,
                    device: str | None = None, resume: bool = False, overrides: Sequence[str] = (),
                    num_samples: int = 64, temperature: float = 1.0, top_k: int | None = None,
                    inception_weights: str | os.PathLike | bool | Any | None = None, progress: bool = True) -> dict[str, Any]:
    """Probe how learnable ``tokenizer``'s tokens are; returns the report and writes it into ``out_dir``.

    tokenizer: an ImageTokenizer or anything :func:`vistok.load` accepts. train, val: anything
    ``vistok score`` reads (folder, image file, shard URLs, 'sample'); shards with a ``cls`` member
    make the probe class-conditional and add linear-probe accuracy. num_tokens: the prefix lengths
    reported ("4,16" or a list; the longest is encoded and modelled); default powers of two up to K
    plus K for tokenizers that decode prefixes, else K. model: a configs/probe/ size. steps:
    trainer.max_steps. overrides: Hydra ``KEY=VALUE`` for configs/probe_train.yaml. num_samples:
    AR samples decoded for the grid and gFID (0: none). inception_weights: None = torch hub cache,
    a path, False = no gFID, or a feature network (tests).
    """
    from vistok.tokenizers.export import fingerprint as tokenizer_fingerprint

    start = time.monotonic()
    for name, value in (("--batch-size", batch_size), ("--limit", limit), ("--steps", steps), ("--top-k", top_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise VistokError(f"{name} must be a positive whole number, got {value!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise VistokError(f"--samples must be a whole number >= 0, got {num_samples!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise VistokError(f"--temperature must be a positive number, got {temperature!r}.")
    torch_device = resolve_device(device)
    source_label = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__
    if isinstance(tokenizer, (str, os.PathLike)):
        from vistok.tokenizers.export import load_with_metadata

        loaded = load_with_metadata(tokenizer)
        tokenizer, fingerprint = loaded.tokenizer, loaded.fingerprint
    else:
        fingerprint = tokenizer_fingerprint(tokenizer)
    if tokenizer.codebook_size is None:
        raise VistokError("probing needs discrete tokens, but this tokenizer's tokens are soft (continuous) codes; probe a VQ, FSQ or LFQ tokenizer.")
    prefixes = getattr(tokenizer, "decodes_prefixes", True)
    counts = parse_token_counts(num_tokens, tokenizer.max_tokens, prefixes)
    k_max = max(counts)
    cfg = compose_probe_config(model, steps, resume, overrides, gpu=torch_device.type == "cuda")
    from vistok.tokenizers.training.run import instantiate_config

    # bad probe settings fail before the encoding (the labels' classes are not known yet: none here)
    instantiate_config(plain(cfg.probe), "probe", codebook_size=tokenizer.codebook_size, seq_len=k_max, num_classes=0)
    out_dir = Path(out_dir)
    check_writable(out_dir, "--out", create=True)
    cache_dir = Path(cache_dir)
    check_writable(cache_dir, "--cache", create=True)
    tokenizer = tokenizer.to(torch_device).eval()

    notes: list[str] = []
    sets = {}
    train, val = (resolve_sample(source, split, tokenizer.image_size) for source, split in ((train, "train"), (val, "val")))
    for split, source in (("train", train), ("val", val)):
        sets[split] = cached_tokens(tokenizer, fingerprint, source, k_max, cache_dir, limit=limit, batch_size=batch_size, device=torch_device)
        how = "reused the cached tokens (no encoding)" if sets[split].cached else "encoded and cached"
        notes.append(f"{split}: {how} in {sets[split].folder} ({len(sets[split].tokens)} images)")
        if progress:
            print(f"vistok probe: {notes[-1]}", flush=True)
    train_set, val_set = sets["train"], sets["val"]
    conditional = train_set.labels is not None and val_set.labels is not None
    num_classes = int(max(train_set.labels.max(), val_set.labels.max())) + 1 if conditional else 0
    if (train_set.labels is None) != (val_set.labels is None):
        notes.append("only one of the sets carries class labels (cls) on every image: the probe is unconditional.")

    codebook = tokenizer.codebook_size
    module = train_probe(cfg, train_set, val_set, codebook, num_classes, out_dir / "ar")
    if module is None:  # a DDP rank other than 0: rank 0 evaluates and writes
        return {}
    ar = module.model.to(torch_device).eval()

    bits = position_bits(ar, val_set.tokens, val_set.labels if conditional else None)
    log2c = bits_per_token(codebook)
    rows = []
    for k in counts:
        ar_image = float(bits[:k].sum())
        unigram = unigram_entropy(train_set.tokens[:, :k], codebook)
        rows.append({"num_tokens": k, "ar_bits_per_token": ar_image / k, "ar_bits_per_image": ar_image,
                     "unigram_bits_per_token": unigram, "unigram_bits_per_image": unigram * k,
                     "codebook_bits_per_token": log2c, "codebook_bits_per_image": log2c * k,
                     "gain_bits_per_token": unigram - ar_image / k})

    files: dict[str, str] = {}
    samples_info: dict[str, Any] = {"num": num_samples, "temperature": temperature, "top_k": top_k}
    gfid_value = None
    if num_samples:
        inception, note = _inception(inception_weights)
        if note:
            notes.append(note.replace("rFID skipped", "gFID skipped"))
        elif num_samples < 2:
            inception = None
            notes.append("gFID skipped: it needs at least 2 samples; pass --samples 2 or more.")
        fid = ReconstructionFID(getattr(inception, "num_features", 2048)) if inception is not None else None
        # rFID's feature path (8-bit uint8 into the FID Inception, autocast off), for gFID's two sides
        features = ReconstructionEvaluator([k_max], inception=inception.eval(), ssim=False).inception_features if fid is not None else None
        generator = torch.Generator(device=torch_device).manual_seed(int(cfg.seed))
        sample_labels = val_set.labels.repeat(math.ceil(num_samples / len(val_set.labels)))[:num_samples] if conditional else None
        grid: list[Tensor] = []
        sampled: list[Tensor] = []
        # samples are drawn, decoded and featurised chunk by chunk: only the grid's images are kept
        for s in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - s)
            lab = sample_labels[s:s + n].to(torch_device) if sample_labels is not None else None
            tokens = ar.sample(n, lab, length=k_max, temperature=temperature, top_k=top_k, generator=generator)
            with torch.no_grad():
                images = tokenizer.decode(tokens).float()
            sampled.append(tokens.cpu())
            grid.append(images[: max(0, 64 - sum(len(g) for g in grid))].cpu())
            if fid is not None:
                fid.update(features(images).cpu(), real=False)
        files["samples"] = str(write_sample_grid(torch.cat(grid), out_dir / "samples.png"))
        samples_info["unigram_bits_per_token_of_samples"] = unigram_entropy(torch.cat(sampled), codebook)
        if fid is not None:
            real_images = 0
            for images in batched(sized_images(val, tokenizer.image_size, limit, True), batch_size):
                fid.update(features(images.to(torch_device)).cpu(), real=True)
                real_images += len(images)
            gfid_value = float(fid.compute())
            samples_info["gfid_real_images"] = real_images
    linear = None
    if conditional:
        accuracy = linear_probe_accuracy(ar_features(ar, train_set.tokens), train_set.labels, ar_features(ar, val_set.tokens), val_set.labels)
        majority = float((val_set.labels == torch.bincount(train_set.labels).argmax()).double().mean())
        linear = {"accuracy": accuracy, "majority_class_accuracy": majority, "num_classes": num_classes}
    else:
        notes.append("linear probe skipped: the data carries no class labels (a cls member in every shard sample).")

    report: dict[str, Any] = {
        "tokenizer": {"source": source_label, "fingerprint": fingerprint, "arch": getattr(tokenizer, "arch", None),
                      "image_size": int(tokenizer.image_size), "max_tokens": int(tokenizer.max_tokens), "codebook_size": codebook,
                      "decodes_prefixes": bool(prefixes)},
        "data": {"train": str(train), "val": str(val), "train_images": len(train_set.tokens), "val_images": len(val_set.tokens),
                 "limit": limit, "conditional": conditional, "num_classes": num_classes},
        "settings": {"model": model, "num_tokens": k_max, "token_counts": counts, "radices": list(ar.radices),
                     "parameters": sum(p.numel() for p in ar.parameters()), "steps_trained": int(module.final_step), "evaluated_step": int(module.selected_step),
                     "config": plain(cfg), "samples": {k: v for k, v in samples_info.items() if k in ("num", "temperature", "top_k")},
                     "device": str(torch_device)},
        "cache": {"train": {"folder": str(train_set.folder), "reused": train_set.cached},
                  "val": {"folder": str(val_set.folder), "reused": val_set.cached}},
        "protocol": PROTOCOL,
        "rows": rows,
        "bits_per_position": [float(b) for b in bits],
        "samples": samples_info,
        "gfid": gfid_value,
        "linear_probe": linear,
        "notes": notes,
        "seconds": time.monotonic() - start,
    }
    files["csv"] = str(write_csv(out_dir / "probe.csv", rows, ROW_FIELDS))
    files["json"] = str(out_dir / "probe.json")
    report["files"] = files
    atomic_write_json(out_dir / "probe.json", report)
    return report


def _inception(weights: Any) -> tuple[Any, str | None]:
    if weights is False:
        return None, "gFID skipped: turned off (inception_weights=False)."
    if isinstance(weights, torch.nn.Module):
        return weights, None
    return load_inception(None if weights in (None, True) else weights)


def write_sample_grid(images: Tensor, path: Path) -> Path:
    """(N, 3, H, W) [0, 1] samples -> one PNG grid, 8 per row, written atomically."""
    from torchvision.utils import make_grid

    from vistok.tokenizers.training.callbacks import save_png

    return save_png(make_grid(images.clamp(0, 1), nrow=min(8, len(images)), padding=1, pad_value=1.0), path)


def summary(report: dict[str, Any]) -> str:
    """The table printed at the end of `vistok probe`, then gFID, the linear probe and notes."""
    settings, data = report["settings"], report["data"]
    lines = [f"AR probe ({settings['model']}, {settings['parameters'] / 1e6:.2f}M parameters, {settings['steps_trained']} steps"
             f"{', class-conditional' if data['conditional'] else ''}; evaluated at step {settings['evaluated_step']}) trained on {data['train_images']} images' tokens, "
             f"validation bits on {data['val_images']} images; unigram: entropy of the training tokens; codebook: log2(size)",
             format_table(report["rows"], SUMMARY_COLUMNS)]
    if report.get("gfid") is not None:
        lines.append(f"gFID {report['gfid']:.2f} ({report['samples']['num']} samples vs {report['samples'].get('gfid_real_images')} validation images)")
    if report.get("linear_probe"):
        lp = report["linear_probe"]
        lines.append(f"linear probe accuracy {lp['accuracy']:.1%} ({lp['num_classes']} classes; majority class {lp['majority_class_accuracy']:.1%})")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("files"):
        lines.append("wrote " + ", ".join(report["files"].values()))
    return "\n".join(lines)
