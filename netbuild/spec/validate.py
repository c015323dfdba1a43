"""Validate a loaded spec against the JSON Schema and fill in its defaults.

Every schema error becomes one located :class:`~netbuild.errors.Issue` whose message says what
was received and what was expected; an unknown key or name gets a "did you mean". All issues are
reported at once, sorted by position. Checks the schema cannot express (shapes, the layer graph,
data) are made while building the network and loading data, with the same error type.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from importlib import resources
from typing import Any

import jsonschema

from ..errors import Issue, SpecError, did_you_mean, expected_one_of
from .load import Spec

SCHEMA_FILE = "netbuild.schema.json"


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema (draft 2020-12) shipped inside the package."""
    text = resources.files("netbuild.schemas").joinpath(SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    # The schema itself is checked against the draft's metaschema by the tests
    # (test_registries.py), not here: that took 0.35 s of every command.
    return jsonschema.Draft202012Validator(schema())


def _resolve(node: Any) -> Any:
    """Follow local ``$ref`` pointers (``#/$defs/name``) until a concrete schema is reached."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node and seen < 50:
        target: Any = schema()
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **extra} if extra else target
        seen += 1
    return node


_JSON_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _describe(value: Any) -> str:
    """``'abc' (a string)``: a received value, shortened, with its YAML kind."""
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    kind = kinds.get(type(value), type(value).__name__)
    text = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, (dict, list)):
        return kind
    return f"{text} ({kind})"


def _type_matches(instance: Any, json_type: Any) -> bool:
    types = json_type if isinstance(json_type, list) else [json_type]
    for t in types:
        if t == "integer" and isinstance(instance, int) and not isinstance(instance, bool):
            return True
        if t == "number" and isinstance(instance, (int, float)) and not isinstance(instance, bool):
            return True
        if t in _JSON_TYPES and isinstance(instance, _JSON_TYPES[t]) and not (
                t != "boolean" and isinstance(instance, bool)):
            return True
    return False


def _branch_fits(branch: Any, instance: Any) -> bool:
    """Whether ``instance`` has the JSON type an ``anyOf`` branch asks for."""
    branch = _resolve(branch)
    if not isinstance(branch, dict):
        return True
    if "type" in branch:
        return _type_matches(instance, branch["type"])
    if "enum" in branch:
        return any(type(instance) is type(v) for v in branch["enum"])
    return True


def _allowed_keys(error) -> list[str]:
    props = error.schema.get("properties", {})
    return [k for k in props]


def _messages(error, spec: Spec) -> list[Issue]:
    """One or more located issues for one jsonschema error."""
    path = tuple(error.absolute_path)
    v = error.validator
    inst = error.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = _allowed_keys(error)
        patterns = error.schema.get("patternProperties", {})
        issues = []
        for key in inst:
            if key in allowed or any(re.search(p, key) for p in patterns):
                continue
            where = path + (key,)
            issues.append(spec.issue(where, f"unknown key '{key}'{did_you_mean(key, allowed)}; "
                                            f"expected one of: {', '.join(sorted(allowed))}",
                                     key=True))
        return issues
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [spec.issue(path, f"missing required key '{missing}'")]
    if v == "enum":
        return [spec.issue(path, f"unknown value {_describe(inst)}; "
                                 f"{expected_one_of(inst, [str(x) for x in error.validator_value])}")]
    if v == "const":
        return [spec.issue(path, f"received {_describe(inst)}; expected {error.validator_value!r}")]
    if v == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        article = "an" if wanted[0] in "aeiou" else "a"
        return [spec.issue(path, f"received {_describe(inst)}; expected {article} {wanted}")]
    if v in ("anyOf", "oneOf"):
        branches = error.validator_value
        fitting = [i for i, b in enumerate(branches) if _branch_fits(b, inst)]
        if fitting:
            sub = [e for e in error.context if e.schema_path and e.schema_path[0] == fitting[0]]
            issues = [i for e in sub for i in _messages(e, spec)]
            if issues:
                return issues
        kinds = []
        for b in branches:
            b = _resolve(b)
            if isinstance(b, dict) and "enum" in b:
                kinds.append("a name")
            elif isinstance(b, dict) and "type" in b:
                kinds.append({"object": "a mapping", "array": "a list"}.get(b["type"], b["type"]))
        return [spec.issue(path, f"received {_describe(inst)}; expected {' or '.join(kinds) or 'another value'}")]
    if v == "not" and isinstance(inst, dict) and "required" in error.validator_value:
        keys = error.validator_value["required"]
        return [spec.issue(path + (keys[-1],), f"give either '{keys[0]}' or '{keys[1]}', not both",
                           key=True)]
    if v in ("minItems", "maxItems") and isinstance(inst, list):
        limit = error.validator_value
        what = "at least" if v == "minItems" else "at most"
        return [spec.issue(path, f"received a list of {len(inst)} items; expected {what} {limit}")]
    if v == "uniqueItems":
        return [spec.issue(path, "received repeated items; expected each item once")]
    if v == "pattern":
        return [spec.issue(path, f"received {_describe(inst)}; expected a name matching "
                                 f"{error.validator_value}")]
    if v in ("minLength", "maxLength"):
        return [spec.issue(path, f"received {_describe(inst)}; expected "
                                 f"{'at least' if v == 'minLength' else 'at most'} "
                                 f"{error.validator_value} characters")]
    return [spec.issue(path, error.message)]


def fill_defaults(instance: Any, node: Any) -> Any:
    """A copy of ``instance`` with every missing key that has a schema ``default`` filled in."""
    instance = copy.deepcopy(instance)
    _fill(instance, node)
    return instance


def _fill(instance: Any, node: Any) -> None:
    node = _resolve(node)
    if not isinstance(node, dict):
        return
    for key in ("anyOf", "oneOf"):
        for branch in node.get(key, []):
            if _branch_fits(branch, instance):
                _fill(instance, branch)
                break
    for sub in node.get("allOf", []):
        cond = sub.get("if")
        if cond is None or _if_holds(cond, instance):
            _fill(instance, sub.get("then", sub if cond is None else {}))
    if isinstance(instance, dict):
        for key, prop in node.get("properties", {}).items():
            prop = _resolve(prop)
            if not isinstance(prop, dict):
                continue
            if key not in instance and "default" in prop:
                instance[key] = copy.deepcopy(prop["default"])
            if key in instance:
                _fill(instance[key], prop)
    if isinstance(instance, list) and "items" in node:
        for item in instance:
            _fill(item, node["items"])


def _if_holds(cond: dict, instance: Any) -> bool:
    if not isinstance(instance, dict):
        return False
    for key, prop in cond.get("properties", {}).items():
        if "const" in prop and instance.get(key) != prop["const"]:
            return False
    return True


def validate(spec: Spec) -> Spec:
    """Check ``spec`` against the schema; return a copy with defaults filled in.

    Raises :class:`SpecError` with every problem found, each located.
    """
    if not isinstance(spec.data, dict):
        raise spec.error((), f"received {_describe(spec.data)}; expected a mapping with the keys "
                             "name, data, model and train")
    issues: list[Issue] = [spec.issue(path, f"received {value}; expected a finite number")
                           for path, value in _non_finite(spec.data, ())]
    for error in _validator().iter_errors(spec.data):
        issues.extend(_messages(error, spec))
    issues += _form_issues(spec)
    unique = {str(i): i for i in issues}
    if unique:
        raise SpecError(list(unique.values()))
    out = spec.copy()
    out.data = fill_defaults(spec.data, schema())
    _drop_shorthand_defaults(spec.data, out.data)
    return out


def _drop_shorthand_defaults(raw: dict, filled: dict) -> None:
    """The long form has no use for the shorthand's keys: the defaults of ``data.x_key`` (with
    ``model.inputs``), ``data.y_key`` and ``train.metrics`` (with ``model.outputs``) are not
    filled in, so that a resolved spec, validated again, is still valid."""
    model = raw["model"]
    drops = ([("data", "x_key")] if "inputs" in model else []) + \
        ([("data", "y_key"), ("train", "metrics")] if "outputs" in model else [])
    for section, key in drops:
        if key not in raw[section]:
            filled[section].pop(key, None)


def _form_issues(spec: Spec) -> list[Issue]:
    """What the schema leaves to code (see :mod:`netbuild.signature`): the long form of
    ``model.inputs`` and ``model.outputs`` is not mixed with the shorthand's keys, and a model
    without ``model.outputs`` has ``train.loss``. Read before the defaults are filled in."""
    model, data, train = (spec.data.get(k) for k in ("model", "data", "train"))
    if not all(isinstance(v, dict) for v in (model, data, train)):
        return []
    issues = []
    if "inputs" in model and "x_key" in data:
        issues.append(spec.issue(("data", "x_key"), "model.inputs gives each input its key; "
                                                    "expected no data.x_key (model.inputs.<name>.key)",
                                 key=True))
    if "outputs" in model:
        for section, key in (("train", "loss"), ("train", "metrics"), ("data", "y_key")):
            if key in spec.data[section]:
                field = {"y_key": "key"}.get(key, key)
                issues.append(spec.issue((section, key), f"model.outputs gives each output its "
                                                         f"{field}; expected no {section}.{key} "
                                                         f"(model.outputs.<name>.{field})",
                                         key=True))
    elif "loss" not in train:
        issues.append(spec.issue(("train",), "missing required key 'loss' (or model.outputs, each "
                                             "output with its loss)"))
    return issues


def _non_finite(node: Any, path: tuple):
    """``(path, value)`` of every NaN or infinite number (JSON Schema's bounds let NaN pass)."""
    if isinstance(node, float) and not math.isfinite(node):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _non_finite(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _non_finite(v, path + (i,))


def enum_names(def_name: str) -> list[str]:
    """The names a ``$defs`` enum lists, for the registry consistency test."""
    return list(schema()["$defs"][def_name]["enum"])
