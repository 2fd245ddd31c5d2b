"""Imports go one way: the model core needs no training stack, the data side has no circles, and
evaluation and training do not reach into each other.

Two checks: what a fresh interpreter actually loads when it imports a module (catches imports
pulled in through other modules), and the source of every import statement, also those inside
functions (catches lazy imports, which a fresh interpreter only meets when the function runs).
Last, :func:`vistok.tokenizers.containers.plain`, the helper that lets the core take Hydra configs
without importing omegaconf.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vistok.tokenizers.containers import plain

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the vistok package
TRAINING_STACK = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
CORE = ("vistok.tokenizers.model", "vistok.tokenizers.export", "vistok.tokenizers.quantizers", "vistok.tokenizers.cli")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def loaded_modules(modules: tuple[str, ...], tmp_path: Path) -> set[str]:
    """Every module in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    script = "; ".join([*(f"import {name}" for name in modules), "import json, sys", "print(json.dumps(sorted(sys.modules)))"])
    # cwd: anywhere but the checkout, whose tokenizers/ folder would shadow Hugging Face's `tokenizers`
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (CORE, (*TRAINING_STACK, "vistok.tokenizers.training", "vistok.eval", "vistok.data")),
        (("vistok.data.images",), ("vistok.data.sample", "vistok.data.shards", "vistok.data.sources", "vistok.data.datamodule")),
        (("vistok.data.sources",), (*TRAINING_STACK, "vistok.data.datamodule", "vistok.tokenizers.training")),
        (("vistok.eval.metrics",), ("vistok.tokenizers.training",)),
        (("vistok.tokenizers.training.losses",), ("vistok.eval.metrics",)),
    ],
    ids=["model-core", "data-images", "data-sources", "eval-metrics", "training-losses"],
)
def test_a_fresh_import_loads_nothing_from_a_higher_layer(modules, forbidden, tmp_path):
    loaded = loaded_modules(modules, tmp_path)
    assert set(modules) <= loaded
    assert sorted(name for name in loaded if _under(name, forbidden)) == []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["vistok", *parts])


def imported_names(source: str, package: str) -> set[str]:
    """Every module an ``import`` statement anywhere in ``source`` (also inside functions) names;
    relative imports are resolved against ``package``, and ``from a import b`` counts as ``a`` and
    ``a.b`` (b may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _sources(folder: str, exclude: str) -> list[Path]:
    return [f for f in sorted((ROOT / folder).rglob("*.py")) if not f.is_relative_to(ROOT / exclude)]


STATIC_RULES = {
    # the model core stays pure torch
    "model-core": (_sources("tokenizers", exclude="tokenizers/training"), (*TRAINING_STACK, "vistok.tokenizers.training")),
    # data/: images <- shards <- sample <- sources, datamodule
    "data-images": ([ROOT / "data" / "images.py"], ("vistok.data",)),
    "data-shards": ([ROOT / "data" / "shards.py"], ("vistok.data.sample", "vistok.data.sources", "vistok.data.datamodule")),
    "data-sample": ([ROOT / "data" / "sample.py"], ("vistok.data.sources", "vistok.data.datamodule", *TRAINING_STACK)),
    "eval-metrics": ([ROOT / "eval" / "metrics.py"], ("vistok.tokenizers.training",)),
    "training-losses": ([ROOT / "tokenizers" / "training" / "losses.py"], ("vistok.eval.metrics",)),
    # speed benchmarking stays apart: evaluation never imports the benchmark
    "eval-not-bench": (_sources("eval", exclude="eval/bench"), ("vistok.eval.bench",)),
}


@pytest.mark.parametrize(("files", "forbidden"), STATIC_RULES.values(), ids=STATIC_RULES.keys())
def test_no_import_statement_reaches_a_higher_layer(files, forbidden):
    assert len(files) >= 1
    offending = []
    for path in files:
        own = module_name(path)
        package = own if path.name == "__init__.py" else own.rpartition(".")[0]
        for name in sorted(imported_names(path.read_text(encoding="utf-8"), package)):
            if _under(name, forbidden) and not _under(name, (own,)):
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offending == []


def test_the_static_check_sees_lazy_and_relative_imports():
    source = "import numpy\n\ndef f():\n    from vistok.data.sample import sample_shard_urls\n    from . import shards\n    from ..eval import metrics\n"
    assert imported_names(source, "vistok.data") == {
        "numpy", "vistok.data.sample", "vistok.data.sample.sample_shard_urls", "vistok.data", "vistok.data.shards",
        "vistok.eval", "vistok.eval.metrics",
    }


def test_plain_turns_config_objects_into_containers():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"levels": [8, 5], "size": "${levels}", "nested": {"a": (1, 2)}})
    assert plain(cfg) == {"levels": [8, 5], "size": [8, 5], "nested": {"a": [1, 2]}}
    assert plain({"_target_": "x", "levels": cfg.levels}) == {"_target_": "x", "levels": [8, 5]}  # nested ListConfig
    assert plain(("a", {"b": 1})) == ["a", {"b": 1}] and plain("text") == "text" and plain(None) is None
