"""Load a YAML spec safely, remembering where every value came from.

The result is a :class:`Spec`: plain Python data (dicts, lists, scalars) plus a map from each
path to its ``file:line:col``. Only YAML's safe types are built (no Python object tags), a
duplicate key is an error, and ``--set PATH=VALUE`` overrides are applied with their own location
so that a bad override names the argument that caused it.
"""

from __future__ import annotations

import copy
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import yaml

from ..errors import Issue, Location, SpecError, format_path

_MERGE_TAG = "tag:yaml.org,2002:merge"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` is a number, not a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_SAFE_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("null", "bool", "int", "float", "str", "binary", "timestamp", "map", "seq", "merge")
}


@dataclass
class Spec:
    """A loaded spec: its data, where each value and key came from, and its folder."""

    data: Any
    source: str
    base_dir: FsPath
    locations: dict = field(default_factory=dict)
    key_locations: dict = field(default_factory=dict)

    def locate(self, path, key: bool = False) -> Location:
        """The location of ``path``, or of its closest ancestor that has one."""
        path = tuple(path)
        if key and path in self.key_locations:
            return self.key_locations[path]
        while path:
            if path in self.locations:
                return self.locations[path]
            path = path[:-1]
        return self.locations.get((), Location(self.source))

    def issue(self, path, message: str, key: bool = False) -> Issue:
        return Issue(self.locate(path, key=key), tuple(path), message)

    def error(self, path, message: str, key: bool = False) -> SpecError:
        return SpecError(self.issue(path, message, key=key))

    def copy(self) -> "Spec":
        return Spec(copy.deepcopy(self.data), self.source, self.base_dir,
                    dict(self.locations), dict(self.key_locations))


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _mark(source: str, mark) -> Location:
    return Location(source, mark.line + 1, mark.column + 1)


class _Builder:
    """Turns a composed YAML node tree into plain data and a location map."""

    def __init__(self, source: str):
        self.source = source
        self.constructor = yaml.constructor.SafeConstructor()
        self.locations: dict = {}
        self.key_locations: dict = {}
        self.issues: list[Issue] = []
        self._active: set[int] = set()

    def build(self, node, path: tuple) -> Any:
        self.locations.setdefault(path, _mark(self.source, node.start_mark))
        if node.tag not in _SAFE_TAGS:
            self.issues.append(Issue(_mark(self.source, node.start_mark), path,
                                     f"the YAML tag '{_short_tag(node.tag)}' is not allowed; "
                                     "expected plain YAML values (mappings, lists, scalars)"))
            return None
        if id(node) in self._active:  # an alias that refers to one of its own ancestors
            self.issues.append(Issue(_mark(self.source, node.start_mark), path,
                                     "a recursive YAML alias is not allowed"))
            return None
        if isinstance(node, yaml.MappingNode):
            self._active.add(id(node))
            try:
                return self._mapping(node, path)
            finally:
                self._active.discard(id(node))
        if isinstance(node, yaml.SequenceNode):
            self._active.add(id(node))
            try:
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            finally:
                self._active.discard(id(node))
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            self.issues.append(Issue(_mark(self.source, node.start_mark), path,
                                     f"cannot read this value: {exc}"))
            return None

    def _mapping(self, node, path: tuple) -> dict:
        out: dict = {}
        merged: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    if not isinstance(src, yaml.MappingNode):
                        self.issues.append(Issue(_mark(self.source, src.start_mark), path,
                                                 "a '<<' merge needs a mapping"))
                        continue
                    value = self.build(src, path)
                    for k, v in (value or {}).items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SAFE_TAGS:
                self.issues.append(Issue(_mark(self.source, key_node.start_mark), path,
                                         "a mapping key must be a plain scalar"))
                continue
            key = self.constructor.construct_object(key_node)
            if not isinstance(key, str):
                key = str(key) if not isinstance(key, (bool, type(None))) else str(key).lower()
            loc = _mark(self.source, key_node.start_mark)
            if key in out:
                first = self.key_locations[path + (key,)]
                self.issues.append(Issue(loc, path + (key,),
                                         f"duplicate key '{key}' (first given at line {first.line})"))
                continue
            self.key_locations[path + (key,)] = loc
            out[key] = self.build(value_node, path + (key,))
        for k, v in merged.items():
            out.setdefault(k, v)
        return out


#: Bounds on a spec's YAML: a hostile file (megabytes of text, a "billion laughs" of nested
#: aliases, lists nested thousands deep) ends in one located line, in bounded memory and time.
MAX_SPEC_BYTES = 16 * 2**20
MAX_DEPTH = 64
MAX_VALUES = 200_000


def _check_bounds(text: str, source: str) -> None:
    """Refuse a text longer than :data:`MAX_SPEC_BYTES`, nested deeper than :data:`MAX_DEPTH`,
    or holding more than :data:`MAX_VALUES` values once its aliases are expanded. One pass over
    PyYAML's events (its parser is not recursive; its composer, which builds the tree, is):
    each anchored node's expanded size is counted once, an alias adds it again."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(Issue(Location(source), (), f"holds {len(text) / 2**20:.1f} MiB of text; "
                                                    f"expected a spec of at most "
                                                    f"{MAX_SPEC_BYTES // 2**20} MiB"))
    sizes: dict[str, int] = {}
    stack: list[list] = [[0, None]]  # [values so far, anchor] of each open collection
    total = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_DEPTH:
                raise SpecError(Issue(_mark(source, event.start_mark), (),
                                      f"the YAML nests deeper than {MAX_DEPTH} levels; expected a "
                                      "spec's mappings and lists"))
            stack.append([1, event.anchor])
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            count, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = count
            stack[-1][0] += count
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = 1
            stack[-1][0] += 1
        elif isinstance(event, yaml.AliasEvent):
            stack[-1][0] += sizes.get(event.anchor, 1)  # an unknown anchor: the composer says so
        else:
            continue
        total = sum(frame[0] for frame in stack)
        if total > MAX_VALUES:
            raise SpecError(Issue(_mark(source, event.start_mark), (),
                                  f"the YAML holds more than {MAX_VALUES:,} values once its "
                                  "aliases are expanded; expected a spec (are aliases nested?)"))


def load_text(text: str, source: str, base_dir: FsPath | None = None) -> Spec:
    """Parse YAML ``text``; ``source`` names it in messages. Raises :class:`SpecError`."""
    base = FsPath(base_dir) if base_dir is not None else FsPath(".")
    try:
        _check_bounds(text, source)
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = _mark(source, mark) if mark else Location(source)
        problem = exc.problem or "invalid YAML"
        context = f" {exc.context}" if exc.context else ""
        raise SpecError(Issue(where, (), f"invalid YAML: {problem}{context}")) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; no mark, a position
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise SpecError(Issue(Location(source, line, column), (),
                              f"invalid YAML: the character {exc.character!r} is not allowed")) from None
    except yaml.YAMLError as exc:
        raise SpecError(Issue(Location(source), (), f"invalid YAML: {exc}")) from None
    except (UnicodeError, ValueError) as exc:
        raise SpecError(Issue(Location(source), (), f"invalid YAML: {exc}")) from None
    if len(nodes) > 1:
        raise SpecError(Issue(_mark(source, nodes[1].start_mark), (),
                              "a spec holds one YAML document; found more than one"))
    if not nodes or nodes[0] is None:
        raise SpecError(Issue(Location(source, 1, 1), (),
                              "the spec is empty; expected a mapping with 'model', 'data' and 'train'"))
    builder = _Builder(source)
    data = builder.build(nodes[0], ())
    if builder.issues:
        raise SpecError(builder.issues)
    return Spec(data, source, base, builder.locations, builder.key_locations)


def load_file(path: str | os.PathLike) -> Spec:
    """Read and parse a spec file. Raises :class:`SpecError` when it cannot be read."""
    path = FsPath(path)
    source = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError(Issue(Location(source), (), "file not found")) from None
    except (OSError, ValueError) as exc:  # a loop of links, a name too long or holding a NUL
        reason = getattr(exc, "strerror", None) or "the name holds a NUL byte"
        raise SpecError(Issue(Location(source), (), f"cannot read: {reason}")) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(Issue(Location(source), (), "is a folder; expected a YAML file"))
    if _is_piped_stdin(st):  # `... | netbuild check /dev/stdin`
        raw = sys.stdin.buffer.read(MAX_PIPED_BYTES + 1)
        if len(raw) > MAX_PIPED_BYTES:
            raise SpecError(Issue(Location(source), (), f"holds more than {MAX_PIPED_BYTES // 2**20} "
                                                        "MiB; expected a YAML spec"))
        base_dir = FsPath.cwd()  # relative data paths: from the current folder
    elif not stat.S_ISREG(st.st_mode):  # reading another pipe or a device would block, or never end
        raise SpecError(Issue(Location(source), (), "is not a regular file (a device, pipe or "
                                                    "socket); expected a YAML file"))
    elif st.st_size > MAX_SPEC_BYTES:  # before reading it
        raise SpecError(Issue(Location(source), (), f"holds {st.st_size / 2**20:,.1f} MiB; "
                                                    f"expected a spec of at most "
                                                    f"{MAX_SPEC_BYTES // 2**20} MiB"))
    else:
        raw, base_dir = _read_bytes(path, source), path.resolve().parent
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(Issue(Location(source), (),
                              f"not UTF-8 text (byte {exc.start}); expected a YAML file")) from None
    if "\x00" in text:
        at = text.index("\x00")
        line, column = text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1
        raise SpecError(Issue(Location(source, line, column), (),
                              "holds a NUL byte; expected a YAML text file"))
    return load_text(text, source, base_dir)


def _read_bytes(path: FsPath, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SpecError(Issue(Location(source), (), "file not found")) from None
    except IsADirectoryError:
        raise SpecError(Issue(Location(source), (), "is a folder; expected a YAML file")) from None
    except OSError as exc:
        raise SpecError(Issue(Location(source), (), f"cannot read: {exc.strerror}")) from None


#: The most a spec piped through standard input may hold.
MAX_PIPED_BYTES = 16 * 2**20


def _is_piped_stdin(st: os.stat_result) -> bool:
    """Whether the file of ``st`` is a pipe and this process's standard input (``/dev/stdin``)."""
    if not stat.S_ISFIFO(st.st_mode):
        return False
    try:
        ours = os.fstat(0)
    except OSError:  # no standard input at all
        return False
    return (ours.st_dev, ours.st_ino) == (st.st_dev, st.st_ino)


# ----- --set overrides --------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(-?\d+)\]")


def parse_path(text: str) -> tuple | None:
    """``model.layers[0].units`` -> ``("model", "layers", 0, "units")``; None when malformed."""
    parts: list = []
    pos = 0
    while pos < len(text):
        m = _PATH_TOKEN.match(text, pos)
        if not m or (m.group(1) and pos > 0 and text[pos] != "."):
            return None
        if pos == 0 and text[0] == ".":
            return None
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return tuple(parts) if parts else None


def apply_override(spec: Spec, argument: str) -> None:
    """Apply one ``PATH=VALUE`` override in place. Raises :class:`SpecError` naming it."""
    where = Location(f"--set {argument}")
    if "=" not in argument:
        raise SpecError(Issue(where, (), "expected PATH=VALUE, for example "
                                         "train.optimizer.learning_rate=0.01"))
    raw_path, raw_value = argument.split("=", 1)
    path = parse_path(raw_path.strip())
    if path is None:
        raise SpecError(Issue(where, (), f"'{raw_path}' is not a path; expected dotted keys and "
                                         "[index] parts, for example model.layers[0].units"))
    if raw_value.strip():
        try:
            value = load_text(raw_value, where.source).data
        except SpecError as exc:
            first = exc.issues[0]
            raise SpecError(Issue(where, path, f"cannot read the value '{raw_value}': "
                                               f"{first.message}")) from None
    else:
        value = None
    if not isinstance(spec.data, dict):
        raise SpecError(Issue(where, path, "the spec is not a mapping"))
    node: Any = spec.data
    for i, part in enumerate(path[:-1]):
        here = path[: i + 1]
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise SpecError(Issue(where, here, f"index {part} is out of range; the list "
                                                   f"has {size} items"))
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise SpecError(Issue(where, here, f"cannot set '{part}' inside a "
                                               f"{type(node).__name__}"))
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            raise SpecError(Issue(where, path, "index is out of range"))
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(Issue(where, path, f"cannot set '{last}' inside a {type(node).__name__}"))
    # The override owns its path and everything below it.
    for table in (spec.locations, spec.key_locations):
        for key in [k for k in table if k[: len(path)] == path]:
            del table[key]
    spec.locations[path] = where
    spec.key_locations[path] = where


def apply_overrides(spec: Spec, arguments) -> Spec:
    """A copy of ``spec`` with every ``--set`` argument applied in order."""
    spec = spec.copy()
    for argument in arguments or ():
        apply_override(spec, argument)
    return spec


__all__ = ["Spec", "load_text", "load_file", "apply_override", "apply_overrides", "parse_path",
           "format_path"]
