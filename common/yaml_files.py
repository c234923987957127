"""Reading YAML that a user hands us (configs, standardization entries), with errors that name the file.

`yaml.safe_load` already refuses tags that would build Python objects, but it (1) raises parser errors
that name no file, and (2) expands aliases without bound: a few hundred bytes of nested aliases ("billion
laughs") expand to gigabytes, and any error message that prints the value runs out of memory. Here the
document is first composed into its node graph, where an alias is one shared node, and the size it would
expand to is counted on that graph before anything is constructed.
"""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

# Far above any real config or entries file (the quickstart expands to ~150 nodes), far below a harmful
# expansion (a 486-byte, 9-level alias bomb expands to 9**9 strings).
MAX_EXPANDED_NODES = 100_000
MAX_REPR = 200

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 3, 12, 12, 12, 12
_repr.maxstring, _repr.maxother = 80, 80


class YamlFileError(ValueError):
    """A YAML file that cannot be read; the message names the file, what was expected and what came."""


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: the work and the text stay small whatever `value` holds (an
    expanded alias bomb would otherwise print billions of items)."""
    text = _repr.repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR - 3] + "..."


def expanded_nodes(node: yaml.Node, where: str) -> int:
    """Nodes of a composed document once its aliases are expanded, counted on the node graph with each
    node visited once: linear in the file however far the aliases nest, and iterative, so deep nesting
    never hits Python's recursion limit. A cycle (an alias inside its own anchor) would expand forever
    and is refused."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        if id(n) in sizes:
            continue
        if isinstance(n, yaml.SequenceNode):
            kids = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            kids = [x for kv in n.value for x in kv]
        else:
            sizes[id(n)] = 1
            continue
        if done:
            open_.discard(id(n))
            sizes[id(n)] = 1 + sum(sizes[id(k)] for k in kids)
            continue
        open_.add(id(n))
        stack.append((n, True))
        for k in kids:
            if id(k) in open_:  # k is n or one of its ancestors
                raise YamlFileError(f"{where}: expected a tree of values, got a YAML alias that refers to its own "
                                    f"anchor (line {k.start_mark.line + 1})")
            stack.append((k, False))
    return sizes[id(node)]


def parse_yaml(text: str, where: str, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """The one document in `text` as plain Python data (None for an empty document); `where` names the
    source in errors (a file path, usually)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()  # the node graph: an alias is one shared node, not a copy
        except yaml.YAMLError as exc:
            raise YamlFileError(f"{where}: expected valid YAML, got a syntax error: {_first_line(exc)}") from None
        except RecursionError:  # PyYAML composes recursively: nesting thousands deep
            raise YamlFileError(f"{where}: expected YAML data, got nesting too deep to read") from None
        if node is None:
            return None
        n = expanded_nodes(node, where)
        if n > max_nodes:
            raise YamlFileError(f"{where}: expected at most {max_nodes} YAML nodes once aliases are expanded, got "
                                f"{n} (nested aliases: a 'billion laughs' file? write the values out instead)")
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:  # e.g. a tag such as !!python/object, which safe loading refuses
            raise YamlFileError(f"{where}: expected plain YAML data (mappings, lists, strings, numbers), "
                                f"got {_first_line(exc)}") from None
    finally:
        loader.dispose()


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
    return text if len(text) <= 300 else text[:297] + "..."
