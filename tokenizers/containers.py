"""Config objects to plain Python containers, for the model core and everything above it.

Hydra hands settings over as OmegaConf ``DictConfig``/``ListConfig``; the model core takes plain
dicts and lists (they go into checkpoints and ``config.json``). The core must not import omegaconf,
so :func:`plain` only uses it when it is already loaded: a config object cannot exist otherwise.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with every OmegaConf container (also one nested in a dict, list or tuple) turned into
    plain dicts and lists, interpolations resolved; mappings become dicts and tuples lists; anything
    else is returned as it is."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and omegaconf.OmegaConf.is_config(value):
        return omegaconf.OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value
