"""Everything that can be checked before anything compiles, for ``netbuild check``, ``train``,
``sweep`` and the Python API alike: the spec's wiring and shapes, what the schema cannot say about
its training section, the memory training would need, and its data against the network.

Each raises located errors, all of a stage's problems at once.
"""

from __future__ import annotations

import json
import math
import os

from . import data, losses
from . import metrics as metrics_mod
from .errors import SpecError
from .network import Network
from .spec import Spec, validate

#: Sections of a spec that are not the run's: how it is swept, searched and tracked. A run of a
#: spec is the same run whatever they say.
NOT_THE_RUNS = ("sweep", "tune", "tracking")


def check(spec: Spec, with_data: bool = True, data_checked: set | None = None) -> Network:
    """Check a validated spec: wiring and shapes, then training, then (``with_data``) every data
    file it names. Returns the network, without parameters.

    ``data_checked``: for checking many variants of one spec (a sweep's points, a search's
    trials), the data checks already made; the data's check depends on the files, the model and
    the losses alone, so a variant that changes none of them is not checked again."""
    network = Network.from_spec(spec, init=False)
    check_training(spec, network)
    if with_data:
        key = None
        if data_checked is not None:
            key = json.dumps([{k: v for k, v in spec.data.items() if k not in ("train", *NOT_THE_RUNS)},
                              spec.data["train"].get("loss"), str(spec.base_dir)],
                             sort_keys=True, default=str)
        if key is None or key not in data_checked:
            check_data(spec, network)
            if key is not None:
                data_checked.add(key)
    return network


def check_point(spec: Spec, data_checked: set | None = None) -> Spec:
    """Everything ``netbuild check`` checks, for a spec as written (a sweep's point, a search's
    trial): the schema, then :func:`check`. Returns the validated spec (defaults filled)."""
    resolved = validate(spec)
    check(resolved, data_checked=data_checked)
    return resolved


def check_data(spec: Spec, network: Network) -> None:
    """Load and check the training, validation and test data against the network (nothing is
    read into memory for it)."""
    data.load_datasets(spec, network, into_memory=False)
    if spec.data["data"].get("test"):
        data.load(spec, "test", network)


def default_monitor(has_validation: bool) -> str:
    return "val_loss" if has_validation else "loss"


def has_validation(spec: Spec) -> bool:
    data = spec.data["data"]
    return bool(data.get("validation") or data.get("validation_split"))


def check_training(spec: Spec, network: Network) -> None:
    """What the schema cannot say about the training of each output and the ``train`` section:
    every ``monitor`` names a recorded key, an output's metric names are unique and fit its loss,
    ``class_weights`` has one weight per class. Raises located errors (before anything is
    compiled)."""
    issues = []
    for head in network.signature.outputs:
        issues += _output_issues(spec, network, head)
    available = network.signature.recorded(has_validation(spec))
    for section in ("early_stopping", "checkpoint", "schedule"):
        name = (spec.data["train"].get(section) or {}).get("monitor")
        if name is not None and name not in available:
            issues.append(spec.issue(("train", section, "monitor"),
                                     f"'{name}' is not recorded by this run; expected one of: "
                                     f"{', '.join(available)}"))
    issues += _memory_issues(spec, network)
    if issues:
        raise SpecError(issues)


def _output_issues(spec: Spec, network: Network, head) -> list:
    names = head.metric_names
    where = head.metrics_path
    issues = [spec.issue(where + (i,), f"'{n}' is listed twice; expected each metric once")
              for i, n in enumerate(names) if n in names[:i]]
    loss = head.loss
    if not losses.is_classification(loss):
        issues += [spec.issue(where + (i,), f"'{n}' scores classes; expected a regression "
                                            f"metric (mse, mae, r2) for the loss {losses.name_of(loss)}")
                   for i, n in enumerate(names) if n in metrics_mod.CLASSIFICATION]
    weights = loss.get("class_weights") if isinstance(loss, dict) else None
    if weights is not None:
        k = losses.n_classes(network.nodes[network.outputs[head.name]].output_shape)
        if not losses.is_classification(loss):
            issues.append(spec.issue(head.loss_path + ("class_weights",),
                                     f"class weights need a classification loss; received {loss['type']}"))
        elif len(weights) != k:
            issues.append(spec.issue(head.loss_path + ("class_weights",),
                                     f"received {len(weights)} weights; expected {k}, one per class "
                                     f"of the output layer"))
    return issues


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _memory_issues(spec: Spec, network: Network) -> list:
    """A spec whose training would not fit in this machine's memory, with the estimate."""
    limit = physical_memory()
    batch = int(spec.data["train"]["batch_size"])
    need = network.memory_estimate(batch)
    if limit is None or need["total"] <= limit:
        return []
    largest = max(network.order, key=lambda n: n.n_params * 5 * 4 + math.prod(n.output_shape) * batch * 8)
    gib = 2**30
    return [spec.issue(largest.path, f"training would need about {need['total'] / gib:,.1f} GiB "
                                     f"(parameters {need['parameters'] / gib:,.1f} GiB, activations "
                                     f"{need['activations'] / gib:,.1f} GiB at batch_size {batch}); "
                                     f"expected at most the {limit / gib:,.1f} GiB this machine has "
                                     f"(layer '{largest.name}' is the largest)")]
