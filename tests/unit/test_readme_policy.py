"""The README's Data handling section agrees with the code: its table of refused fields
is the one in `zrproxy/retention_rules.py`, and every test it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from zrproxy.retention_rules import markdown_tables

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_readme_prints_the_retention_rules_table() -> None:
    begin, end = "<!-- retention-rules:begin -->\n", "<!-- retention-rules:end -->"
    printed = README[README.index(begin) + len(begin) : README.index(end)]
    assert printed == markdown_tables()


def test_every_test_the_data_handling_section_cites_exists() -> None:
    cited = re.findall(
        r"`(tests/(?:unit|e2e|proofs)/test_\w+\.py)::(test_\w+)`", _section("Data handling")
    )
    assert len(cited) >= 15
    for path, name in cited:
        tree = ast.parse((ROOT / path).read_text())
        names = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert name in names, f"{path}::{name}"


def test_the_section_states_each_of_the_five_promises() -> None:
    section = _section("Data handling")
    for number in range(1, 6):
        assert f"\n| {number}. " in section
