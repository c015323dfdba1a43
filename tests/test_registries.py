"""The schema and the registries list the same names, so they cannot drift apart."""

from __future__ import annotations

import pytest

from netbuild import activations, initializers, layers, losses, metrics, optimizers
from netbuild.spec.validate import enum_names, schema

PAIRS = [
    ("layer_type", layers.REGISTRY),
    ("activation_name", activations.REGISTRY),
    ("initializer_name", initializers.REGISTRY),
    ("loss_name", losses.REGISTRY),
    ("optimizer_type", optimizers.REGISTRY),
    ("metric_name", metrics.REGISTRY),
]


@pytest.mark.parametrize("def_name,registry", PAIRS, ids=[p[0] for p in PAIRS])
def test_schema_enum_equals_registry(def_name, registry):
    assert sorted(enum_names(def_name)) == sorted(registry)


def _dispatched(def_name: str) -> list[str]:
    return [entry["if"]["properties"]["type"]["const"] for entry in schema()["$defs"][def_name]["allOf"]]


def test_every_layer_type_has_its_schema_entry():
    assert sorted(_dispatched("layer")) == sorted(layers.REGISTRY)


def test_every_optimizer_has_its_schema_entry():
    assert sorted(_dispatched("optimizer")) == sorted(optimizers.REGISTRY)


def test_every_layer_class_is_registered_under_its_type():
    for name, cls in layers.REGISTRY.items():
        assert cls.type == name


def test_unknown_names_suggest_the_closest():
    with pytest.raises(KeyError, match="did you mean 'relu'"):
        activations.get("rellu")
    with pytest.raises(KeyError, match="did you mean 'dense'"):
        layers.get("dens")


def test_schema_is_valid_draft_2020_12():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())


def test_no_object_schema_allows_unknown_keys():
    """Every object schema closes itself with additionalProperties: false (or dispatches to
    branches that do)."""
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False or "allOf" in node, where
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(schema(), "#")


def test_spec_reference_is_current():
    """docs/spec.md is rendered from the schema; `make docs` regenerates it."""
    from conftest import ROOT

    from netbuild.spec.reference import markdown

    assert (ROOT / "docs" / "spec.md").read_text() == markdown(), "run `make docs`"
