"""The spec: loading YAML with locations, ``--set`` overrides, and validation."""

from .load import Spec, apply_overrides, load_file, load_text
from .validate import schema, validate

__all__ = ["Spec", "load_file", "load_text", "apply_overrides", "validate", "schema"]
