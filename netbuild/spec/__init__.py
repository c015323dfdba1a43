"""The spec: loading YAML with locations, ``--set`` overrides, and validation."""

from __future__ import annotations

import os
from typing import Iterable

from .load import Spec, apply_overrides, load_file, load_text
from .validate import schema, validate


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Spec:
    """Load a spec file, apply ``--set`` overrides (``PATH=VALUE``) and validate it (defaults
    filled). Raises located errors. A single override may be given as a string."""
    if isinstance(overrides, str):
        overrides = [overrides]
    return validate(apply_overrides(load_file(path), overrides))


__all__ = ["Spec", "load_file", "load_text", "load_spec", "apply_overrides", "validate", "schema"]
