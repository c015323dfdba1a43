"""The spec reference (docs/spec.md), rendered from the JSON Schema so it cannot drift from it.

``python -m netbuild.spec.reference > docs/spec.md`` (or ``make docs``) regenerates it; a test
checks that the committed file is current.
"""

from __future__ import annotations

import json
from typing import Any

from .validate import _resolve, schema

HEADER = """\
# netbuild spec reference

Generated from `schemas/netbuild.schema.json` by `make docs`; do not edit by hand.
Every key, its type and range, and its default. Unknown keys are errors everywhere.
Relative data paths are relative to the spec file.
"""


#: Shared definitions shown as links to their own section instead of spelled out.
_LINKED = {
    "#/$defs/activation": "[activation](#activations)",
    "#/$defs/initializer": "[initializer](#initializers)",
    "#/$defs/layer": "[layer](#layers-modellayers)",
    "#/$defs/loss": "[loss](#losses)",
    "#/$defs/optimizer": "[optimizer](#optimizers-trainoptimizer)",
    "#/$defs/metric_name": "[metric](#metrics)",
    "#/$defs/metric": "[metric](#metrics)",
    "#/$defs/schedule": "[schedule](#schedules-trainschedule)",
    "#/$defs/monitor": "record key",
    "#/$defs/mode": "`auto`, `min` or `max`",
}


def _type(node: Any) -> str:
    if isinstance(node, dict) and node.get("$ref") in _LINKED:
        return _LINKED[node["$ref"]]
    node = _resolve(node)
    if node is True:
        return "any"
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" for v in node["enum"])
    if "anyOf" in node:
        return " or ".join(_type(b) for b in node["anyOf"])
    t = node.get("type", "")
    if t == "array":
        items = node.get("items", {})
        return f"list of {_type(items)}"
    if t == "object":
        kinds = node.get("properties", {}).get("type")
        return "mapping" + (f" with `type` {_type(kinds)}" if kinds else "")
    return {"integer": "integer", "number": "number", "string": "string",
            "boolean": "boolean"}.get(t, t or "value")


def _range(node: Any) -> str:
    node = _resolve(node)
    if not isinstance(node, dict):
        return ""
    parts = []
    if "minimum" in node:
        parts.append(f">= {node['minimum']}")
    if "exclusiveMinimum" in node:
        parts.append(f"> {node['exclusiveMinimum']}")
    if "maximum" in node:
        parts.append(f"<= {node['maximum']}")
    if "exclusiveMaximum" in node:
        parts.append(f"< {node['exclusiveMaximum']}")
    if "minItems" in node:
        parts.append(f"{node['minItems']} to {node.get('maxItems', 'any')} items")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    items = node.get("items")
    if items is not None and not parts:
        return _range(items)
    return ", ".join(parts)


def _table(properties: dict, required: list[str], skip=("type", "name", "inputs")) -> list[str]:
    rows = ["| key | type | range | default | description |", "|---|---|---|---|---|"]
    for key, prop in properties.items():
        if prop is True or key in skip:
            continue
        resolved = _resolve(prop)
        default = prop.get("default", resolved.get("default") if isinstance(resolved, dict) else None)
        shown = "required" if key in required else (
            f"`{json.dumps(default)}`" if default is not None else "")
        desc = prop.get("description") or (resolved.get("description", "") if isinstance(resolved, dict) else "")
        rows.append(f"| `{key}` | {_type(prop)} | {_range(prop)} | {shown} | {desc} |")
    return rows


def _section(title: str, node: Any, skip=()) -> list[str]:
    node = _resolve(node)
    out = [f"## {title}", ""]
    if node.get("description"):
        out += [node["description"], ""]
    out += _table(node.get("properties", {}), node.get("required", []), skip)
    return out + [""]


def _dispatched(title: str, def_name: str, common: list[str]) -> list[str]:
    node = schema()["$defs"][def_name]
    out = [f"## {title}", ""] + common
    for entry in node["allOf"]:
        name = entry["if"]["properties"]["type"]["const"]
        then = entry["then"]
        out += [f"### `{name}`", ""]
        props = {k: v for k, v in then.get("properties", {}).items() if v is not True}
        if props:
            out += _table(props, then.get("required", []))
        else:
            out.append("No options.")
        out.append("")
    return out


def markdown() -> str:
    s = schema()
    d = s["$defs"]
    lines = [HEADER]
    lines += _section("Top level", s, skip=())
    lines += _section("`data`", d["data"])
    lines += ["`validation` and `validation_split` exclude each other.", ""]
    lines += _section("`model`", d["model"])
    lines += ["`input_shape` and `inputs` exclude each other; one of them is required. Without "
              "`outputs`, the model's output is its last layer's, trained with `train.loss` and "
              "scored by `train.metrics`; with `outputs`, each output names its own (and "
              "`train.loss`, `train.metrics`, `data.y_key` are not given; with `inputs`, neither "
              "is `data.x_key`).", ""]
    model = d["model"]["properties"]
    lines += _section("`model.inputs.<name>`", model["inputs"]["additionalProperties"])
    lines += _section("`model.outputs.<name>`", model["outputs"]["additionalProperties"])
    lines += ["Each epoch records the weighted total `loss`, then `<output>_loss` and "
              "`<output>_<metric>` for each output (with validation data, the same keys after "
              "`val_`).", ""]
    lines += _dispatched("Layers (`model.layers[]`)", "layer", [
        "Every layer takes `type`, an optional unique `name` (default `<type>_<index>`) and "
        "optional `inputs` (names of earlier layers, or of the model's inputs: `input` with "
        "`input_shape`; default: the previous layer).", ""])
    lines += ["## Activations", "", "A name, or a mapping `{type: name, alpha: ...}`: "
              + ", ".join(f"`{n}`" for n in d["activation_name"]["enum"]) + ".", "",
              "## Initializers", "", "A name, or a mapping `{type: name, stddev|limit|gain: ...}`: "
              + ", ".join(f"`{n}`" for n in d["initializer_name"]["enum"]) + ".", ""]
    lines += _section("`train`", d["train"])
    lines += ["### Losses", "", "A name, or a mapping `{type: name, ...}` with "
              "`label_smoothing` (cross-entropies) or `delta` (huber): "
              + ", ".join(f"`{n}`" for n in d["loss_name"]["enum"]) + ".", ""]
    lines += _section("`train.early_stopping`", d["train"]["properties"]["early_stopping"])
    lines += _section("`train.checkpoint`", d["train"]["properties"]["checkpoint"])
    lines += _dispatched("Optimizers (`train.optimizer`)", "optimizer", [])
    lines += _dispatched("Schedules (`train.schedule`)", "schedule", [d["schedule"]["description"], ""])
    lines += ["## Metrics", "", "A name, or a mapping `{type: name, k: ...}` (`k` for top_k_accuracy): "
              + ", ".join(f"`{n}`" for n in d["metric_name"]["enum"]) + ".", "",
              "Every epoch records `loss`, each metric, and with validation data `val_loss` and "
              "`val_<metric>`: these are the keys a `monitor` can name.", ""]
    lines += _section("`sweep`", d["sweep"])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
