"""Looking up a spec value in a registry: a name (``relu``) or a mapping with ``type`` and
options (``{type: leaky_relu, alpha: 0.1}``). Imports nothing of netbuild but errors."""

from __future__ import annotations

from typing import Any

from .errors import expected_one_of


def name_of(config: Any) -> str:
    """The name of a spec value: the value itself, or its ``type``."""
    return config["type"] if isinstance(config, dict) else config


def lookup(registry: dict, config: Any, kind: str) -> tuple[Any, dict]:
    """``(entry, options)`` for a spec value; KeyError listing the names when it is unknown."""
    name = name_of(config)
    if name not in registry:
        raise KeyError(f"unknown {kind} '{name}'; {expected_one_of(name, registry)}")
    options = {k: v for k, v in config.items() if k != "type"} if isinstance(config, dict) else {}
    return registry[name], options
