"""``netbuild check``'s work: load, override and validate a spec, infer shapes, check the data."""

from __future__ import annotations

from .network import Network
from .spec import Spec, apply_overrides, load_file, validate


def load_spec(path: str, overrides=()) -> Spec:
    """Load a spec file, apply ``--set`` overrides and validate it (defaults filled)."""
    return validate(apply_overrides(load_file(path), overrides))


def check(path: str, overrides=(), with_data: bool = True) -> tuple[Spec, Network]:
    """Everything that can be checked before compiling; raises located errors, all at once
    within each stage (spec, shapes, data)."""
    from . import data
    from .train import check_training, load_datasets

    spec = load_spec(path, overrides)
    network = Network.from_spec(spec, init=False)
    check_training(spec, network)
    if with_data:
        load_datasets(spec, network)
        if spec.data["data"].get("test"):
            data.load(spec, "test", network)
    return spec, network
