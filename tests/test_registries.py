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
    branches that do), unless it is a map from names (propertyNames) to one schema each."""
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object":
                keyed = "propertyNames" in node and isinstance(node.get("additionalProperties"), dict)
                assert node.get("additionalProperties") is False or "allOf" in node or keyed, where
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


def _layer_schema(type_name: str) -> dict:
    (entry,) = [e["then"] for e in schema()["$defs"]["layer"]["allOf"]
                if e["if"]["properties"]["type"]["const"] == type_name]
    return entry


#: How a hyperparameter's annotation reads for each kind of schema entry.
ANNOTATION_OF = {
    "positive_int": "int", "integer": "int", "boolean": "bool", "number": "float",
    "activation": "Activation", "initializer": "Initializer", "penalty": "float",
    "array": "list[int]", "string": "str",
}


def _kind(prop: dict) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop or "oneOf" in prop:
        return "choice"
    return prop.get("type") or ("string" if "enum" in prop else "?")


@pytest.mark.parametrize("type_name", sorted(layers.REGISTRY))
def test_a_layers_hyperparameters_are_its_schema_keys(type_name):
    """One source each: the schema holds every default (and the keys), the class annotates the
    same keys with their types; an optional key without a default is annotated ``| None``."""
    cls = layers.REGISTRY[type_name]
    entry = _layer_schema(type_name)
    props = {k: v for k, v in entry["properties"].items() if k not in ("type", "name", "inputs")}
    hyper = cls.hyperparameters()
    assert set(hyper) == set(props), type_name
    required = set(entry.get("required", []))
    for key, annotation in hyper.items():
        prop, kind = props[key], _kind(props[key])
        optional = key not in required and "default" not in prop
        assert annotation.endswith("| None") == optional, (key, annotation)
        if kind in ANNOTATION_OF:
            want = ANNOTATION_OF[kind].removesuffix(" | None")
            assert annotation.removesuffix(" | None") == want, (key, annotation, kind)
        else:  # an int or a list of ints, a padding: one of the aliases in layers.base
            assert annotation.removesuffix(" | None") in ("Ints", "Padding", "Sides", "str"), (key, annotation)


def test_layers_hold_no_defaults_of_their_own():
    """Defaults live in the schema: no ``config.get(key, default)`` in a layer family."""
    import re
    from pathlib import Path

    for module in Path(layers.__file__).parent.glob("*.py"):
        text = module.read_text()
        assert not re.search(r"config\.get\([^)]*,", text), module.name
        assert "self.config[" not in text, module.name
