"""Reading a sweep file's YAML safely: one UTF-8 document, every key once, bounded size.

PyYAML's ``SafeLoader`` keeps the last of two equal keys silently and expands aliases without
limit (a "billion laughs" file takes all memory); a sweep file is a few hundred nodes, so
:class:`_StrictLoader` refuses both, naming the key path and line. What the values *mean* is
:mod:`debias.spec`'s business; this module only turns bytes into a plain tree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

__all__ = ["MAX_SWEEP_BYTES", "YAMLRefused", "decode_utf8", "load_yaml", "unshared",
           "yaml_problem"]


#: A sweep file is a few hundred YAML nodes; anything near these is an accident or an attack.
_MAX_YAML_NODES = 100_000  # nodes after expanding every alias (counted, never expanded)
_MAX_YAML_DEPTH = 100  # nesting levels (a deeper document would exhaust Python's stack)
MAX_SWEEP_BYTES = 10 * 1024 * 1024


class YAMLRefused(yaml.YAMLError):
    """A document that parses but is refused (a duplicate key, an alias bomb); ``problem``
    is the whole message."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _key_path(segments: Iterable[str | None]) -> str:
    out = ""
    for s in segments:
        if s is not None:
            out += s if s.startswith("[") or not out else f".{s}"
    return out


def _at(mark: Any, same_line: bool = False) -> str:
    return f"line {mark.line + 1}" + (f", column {mark.column + 1}" if same_line else "")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML keeps the last silently),
    recursive aliases, nesting deeper than ``_MAX_YAML_DEPTH`` and documents that would
    expand to more than ``_MAX_YAML_NODES`` nodes. Sizes are counted while composing: a
    node's size is 1 + its children's, an alias counts its anchor's size, memoized per node,
    so a billion-laughs file is refused after composing its few dozen nodes, and nothing
    downstream (``_expand_env``, the override paths, pydantic) ever walks an expansion."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size (once composed)
        self._segments: list[str | None] = []  # the key path of the node being composed
        self._paths: dict[int, str] = {}  # id(mapping node) -> its key path
        self._pairs: dict[int, list[Any]] = {}  # id(mapping node) -> its own (key, value)s

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise YAMLRefused(f"the alias *{event.anchor} at {_at(event.start_mark)} "
                                   "refers to a node that contains it (a recursive structure); "
                                   "expected a finite document")
        if len(self._segments) >= _MAX_YAML_DEPTH:
            raise YAMLRefused(f"nested more than {_MAX_YAML_DEPTH} levels deep at "
                               f"{_at(self.peek_event().start_mark)}; a sweep file is a few "
                               "levels deep")
        if isinstance(index, yaml.ScalarNode):
            segment: str | None = str(index.value)
        elif isinstance(index, int):
            segment = f"[{index}]"
        else:  # the root, or a mapping key
            segment = None if index is None else "?"
        self._segments.append(segment)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._segments.pop()
        if id(node) in self._sizes:  # an alias: its anchor's size, already counted
            size = self._sizes[id(node)]
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
            self._pairs[id(node)] = list(node.value)  # before merge keys are flattened
            self._paths[id(node)] = _key_path([*self._segments, segment])
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(v)] for v in node.value)
        else:
            size = 1
        if size > _MAX_YAML_NODES:
            path = _key_path([*self._segments, segment])
            raise YAMLRefused(
                f"{path + ' ' if path else ''}({_at(node.start_mark)}): the value expands to "
                f"more than {_MAX_YAML_NODES:,} nodes through YAML aliases (*name repeating "
                "&name); a sweep file has a few hundred: write the values out, or use fewer "
                "aliases")
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in self._pairs.get(id(node), node.value):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys given beside it override the merged ones
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base class refuses it
                if first is not key_node:
                    same = first.start_mark.line == key_node.start_mark.line
                    path = _key_path([self._paths.get(id(node)), str(key)])
                    raise YAMLRefused(
                        f"{path}: duplicate key (at {_at(first.start_mark, same)} and again "
                        f"at {_at(key_node.start_mark, same)}); give each key once (YAML "
                        "would silently keep only the last)")
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """One YAML document through :class:`_StrictLoader`; raises ``yaml.YAMLError``."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error as one problem line: where, and what."""
    if isinstance(exc, YAMLRefused):
        return exc.problem
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return (f"YAML syntax error at line {line}: character #x{exc.character:04x} is not "
                "allowed in YAML (control characters other than tab and newline)")
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"YAML syntax error{where}: {problem}"


def decode_utf8(data: bytes) -> str:
    """The file's text; raises ``ValueError(problem)`` naming the first byte that is not
    UTF-8."""
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        hint = (" (it starts with a UTF-16 byte-order mark)"
                if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
        raise ValueError(f"the file is not UTF-8{hint}: byte {data[exc.start]:#04x} at byte "
                         f"offset {exc.start} (line {line}) ({exc.reason}); save it as "
                         "UTF-8") from None
    return text.removeprefix("\ufeff")


def unshared(value: Any) -> Any:
    """A tree copy in which no two keys share a dict or list (YAML aliases share them, so
    ``--set train.lr=...`` would otherwise also change every key aliasing ``train``). Only
    after ``_StrictLoader`` has bounded the expanded size."""
    if isinstance(value, dict):
        return {k: unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unshared(v) for v in value]
    return value
