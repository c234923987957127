"""Reading YAML that a user hands us (configs, standardization entries), with errors that name the file.

`yaml.safe_load` already refuses tags that would build Python objects, but it (1) raises parser errors
that name no file, and (2) expands aliases without bound: a few hundred bytes of nested aliases ("billion
laughs") expand to gigabytes, and any error message that prints the value runs out of memory. Here the
document is first composed into its node graph, where an alias is one shared node, and the size it would
expand to is counted on that graph before anything is constructed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Far above any real config (the quickstart expands to ~150 nodes), far below a harmful expansion.
MAX_EXPANDED_NODES = 100_000
MAX_REPR = 200


class YamlFileError(ValueError):
    """A YAML file that cannot be read; the message names the file, what was expected and what came."""


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """repr(value) cut to `limit` characters: values from files go into messages, and must not flood them."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes the document would have with every alias expanded, stopping once past `limit`. Memoised on
    node identity: an alias is the same node object, so the walk is linear in the composed graph."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > 200:  # recursive aliases (a node containing itself) expand forever
            return limit + 1
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child, depth + 1)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > limit:
                    break
        sizes[id(n)] = total
        return total

    return size(node, 0)


def parse_yaml(text: str, where: str, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """The one document in `text` as plain Python data (None for an empty document); `where` names the
    source in errors (a file path, usually)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise YamlFileError(f"{where}: expected valid YAML, got a syntax error: {_first_line(exc)}") from None
    if node is None:
        return None
    n = _expanded_size(node, max_nodes)
    if n > max_nodes:
        raise YamlFileError(f"{where}: expected at most {max_nodes} YAML nodes once aliases are expanded, got more "
                            "(nested or recursive aliases; write the values out instead)")
    try:
        return yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as exc:  # e.g. a tag such as !!python/object, which safe loading refuses
        raise YamlFileError(f"{where}: expected plain YAML data (mappings, lists, strings, numbers), "
                            f"got {_first_line(exc)}") from None


def read_yaml(path: str | Path, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """parse_yaml of a file's text; a missing or unreadable file is named as such."""
    p = Path(path)
    try:
        text = p.read_text()
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{str(p)!r}: expected a UTF-8 text YAML file, got undecodable bytes ({exc.reason} "
                            f"at byte {exc.start})") from None
    except OSError as exc:
        raise YamlFileError(f"{str(p)!r}: expected a readable YAML file, got {exc.strerror or exc}") from None
    return parse_yaml(text, repr(str(p)), max_nodes)


def _first_line(exc: yaml.YAMLError) -> str:
    """A YAML error in one line, with its position ('line 3, column 7') when known."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
    context = getattr(exc, "context", None)
    text = f"{context}, {problem}" if context and problem and context not in problem else str(problem)
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return short_repr(text, 300).strip("'\"") if len(text) > 300 else text
