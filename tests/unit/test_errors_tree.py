"""errors: the tree drawn in the module docstring is the class hierarchy, and each
ProxyError's status in it is the class's."""

from __future__ import annotations

import inspect
import re

from zrproxy import errors
from zrproxy.errors import ProxyError, ZrproxyError

# One tree line: the drawing, a class name, then optional arguments and notes.
_LINE = re.compile(r"^(?P<lead>[ │├└─]*)(?P<name>[A-Z][A-Za-z]+)\b(?P<rest>.*)$")


def drawn_tree(doc: str) -> dict[str, tuple[str | None, str]]:
    """Class name -> (parent name, rest of its line), from the docstring's tree."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "ZrproxyError")
    base = len(lines[start]) - len(lines[start].lstrip())
    found: dict[str, tuple[str | None, str]] = {}
    stack: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        match = _LINE.match(line[base:])
        assert match, f"not a tree line: {line!r}"
        lead = match["lead"]
        depth = len(lead) // 4
        assert len(lead) % 4 == 0 and depth <= len(stack), f"bad indent: {line!r}"
        del stack[depth:]
        found[match["name"]] = (stack[-1] if stack else None, match["rest"])
        stack.append(match["name"])
    return found


def real_tree() -> dict[str, str | None]:
    classes = inspect.getmembers(errors, inspect.isclass)
    return {
        name: (None if cls is ZrproxyError else cls.__bases__[0].__name__)
        for name, cls in classes
        if issubclass(cls, ZrproxyError) and cls.__module__ == errors.__name__
    }


def test_docstring_tree_is_the_class_hierarchy() -> None:
    assert errors.__doc__ is not None
    drawn = {name: parent for name, (parent, _) in drawn_tree(errors.__doc__).items()}
    assert drawn == real_tree()


def test_docstring_tree_gives_each_status() -> None:
    assert errors.__doc__ is not None
    for name, (_, rest) in drawn_tree(errors.__doc__).items():
        cls = getattr(errors, name)
        if issubclass(cls, ProxyError) and cls is not ProxyError:
            assert rest.split()[:1] == [str(cls.status)], name


def test_the_tree_reader_can_fail() -> None:
    doc = """
    ZrproxyError
    ├── ConfigError
    └── ProxyError
        └── MalformedJSON        400
    """
    assert drawn_tree(doc) == {
        "ZrproxyError": (None, ""),
        "ConfigError": ("ZrproxyError", ""),
        "ProxyError": ("ZrproxyError", ""),
        "MalformedJSON": ("ProxyError", "        400"),
    }
    assert {n: p for n, (p, _) in drawn_tree(doc).items()} != real_tree()
