"""The package's shape, read with `ast`: import layering, docstrings, who reads the env."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "zrproxy"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}

# Module -> exactly the zrproxy modules it imports, layer by layer: lower layers never
# import higher ones. Tight on purpose: a new import (upward or not) fails until it is
# added here, where a reviewer sees the layering change.
ALLOWED: dict[str, set[str]] = {
    # leaves
    "__init__": set(),
    "caches": set(),
    "errors": set(),
    "headers": {"ids"},
    "ids": set(),
    "outcomes": set(),
    "metrics": {"__init__", "outcomes"},
    "mock_wire": set(),
    "hardening": set(),
    "usage": set(),
    "logs": set(),
    "upstream_health": set(),
    "retention_rules": set(),
    "auditfiles": set(),
    "mock_upstream": {"mock_wire"},
    # on errors only
    "dialects": {"errors"},
    "sse": set(),
    "deadlines": set(),
    "exchange": {"deadlines", "outcomes", "sse"},
    "http1": {"errors", "exchange", "outcomes", "sse"},
    "pool": {"http1"},
    "request": {"errors", "headers"},  # what a handler sees of a request
    "response": {"request"},  # what it answers with
    "streaming": {"exchange", "outcomes", "request", "response", "usage"},
    # on dialects: the config, built up from its shape (config_types) to its public face
    "config_types": {"dialects"},
    "config_derived": {"config_types"},
    "config_values": {"config_types", "errors"},
    "config_sections": {"config_derived", "config_types", "config_values", "dialects", "errors"},
    "config": {"config_derived", "config_sections", "config_types", "config_values", "errors"},
    # on config
    "auth": {"config", "errors", "headers"},
    "routing": {"config", "errors"},
    "checks": {"config"},
    "policy": {"config", "metrics", "routing"},
    "audit": {"auditfiles", "config", "metrics", "usage"},
    "auditcli": {"auditfiles", "config", "errors"},
    "upstream": {
        "config",
        "deadlines",
        "dialects",
        "errors",
        "exchange",
        "headers",
        "listener",
        "outcomes",
        "pool",
    },
    "limits": {"config", "errors"},
    "listener": set(),
    "connection": {"errors"},
    "server": {
        "config",
        "dialects",
        "errors",
        "headers",
        "request",
        "response",
    },  # the API's HTTP/1.1
    "reload": {"config", "errors"},
    "admin": {"config", "errors"},
    # the request handlers, the service, its processes, the command line
    "proxy": {
        "audit",
        "auth",
        "caches",
        "config",
        "dialects",
        "errors",
        "exchange",
        "headers",
        "limits",
        "metrics",
        "outcomes",
        "policy",
        "request",
        "response",
        "retention_rules",
        "routing",
        "streaming",
        "upstream",
        "upstream_health",
        "usage",
    },
    "app": {
        "admin",
        "audit",
        "config",
        "connection",
        "errors",
        "listener",
        "metrics",
        "policy",
        "proxy",
        "request",
        "response",
        "routing",
        "server",
        "upstream",
    },
    "workers": {
        "app",
        "config",
        "errors",
        "hardening",
        "logs",
        "metrics",
        "policy",
        "proxy",
        "routing",
    },
    "cli": {
        "__init__",
        "app",
        "auditcli",
        "auth",
        "checks",
        "config",
        "connection",
        "errors",
        "hardening",
        "logs",
        "metrics",
        "mock_upstream",
        "policy",
        "reload",
        "routing",
        "workers",
    },
    "__main__": {"cli"},
}


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _imports(name: str) -> set[str]:
    """The zrproxy modules `name` imports, anywhere in the file (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "zrproxy":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = ["zrproxy", *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "zrproxy":
                base = node.module.split(".")
            else:
                continue
            if len(base) > 1:
                found.add(base[1])
            else:  # from zrproxy import a, b: modules, or names from __init__
                for alias in node.names:
                    found.add(alias.name if alias.name in MODULES else "__init__")
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: _imports(name) for name in MODULES}


def test_the_package_is_where_we_think() -> None:
    assert {"config", "cli", "errors", "usage", "proxy", "app"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layering(name: str) -> None:
    forbidden = _imports(name) - ALLOWED.get(name, set())
    assert not forbidden, f"zrproxy.{name} may not import {sorted(forbidden)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_allow_list_is_as_tight_as_the_imports(name: str) -> None:
    unused = ALLOWED.get(name, set()) - _imports(name)
    assert not unused, f"zrproxy.{name} no longer imports {sorted(unused)}: drop it from ALLOWED"


def test_allow_list_names_only_real_modules() -> None:
    assert set(ALLOWED) == set(MODULES)
    assert set().union(*ALLOWED.values()) <= set(MODULES)


def test_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(graph.get(name, ())):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_import_graph_reader_sees_known_edges() -> None:
    # Guards the reader itself: an empty graph would make the layering tests vacuous.
    graph = import_graph()
    assert "errors" in graph["config"]
    assert {"config", "errors"} <= graph["auth"]
    assert "cli" in graph["__main__"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_has_a_docstring(name: str) -> None:
    docstring = ast.get_docstring(_tree(name))
    assert docstring and docstring.strip(), f"zrproxy/{name}.py has no module docstring"


def _environment_reads(tree: ast.Module) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "environb", "getenv"}:
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(f"os.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            for alias in node.names:
                if alias.name in {"environ", "environb", "getenv"}:
                    found.append(f"from os import {alias.name} (line {node.lineno})")
    return found


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"config"}))
def test_only_config_reads_the_environment(name: str) -> None:
    assert _environment_reads(_tree(name)) == []


def test_environment_reader_finds_reads() -> None:
    assert _environment_reads(_tree("config"))  # config.process_environment reads it
    sample = ast.parse("import os\nfrom os import getenv\nx = os.environ\n")
    assert len(_environment_reads(sample)) == 2
