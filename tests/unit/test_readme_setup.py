"""The README's "Configure it for OpenAI and Anthropic" walkthrough, as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zrproxy.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
ENV_VARS = ("OPENAI_API_KEY", "OPENAI_EU_API_KEY", "ANTHROPIC_API_KEY")


def section() -> str:
    text = README.read_text()
    return text.split("## Configure it for OpenAI and Anthropic", 1)[1].split("\n## ", 1)[0]


def walkthrough_config() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", section(), re.DOTALL)
    assert len(blocks) == 1
    config = re.sub(r"^ {3}", "", blocks[0], flags=re.MULTILINE)  # the list indent
    digests = iter(["ab" * 32, "cd" * 32])  # each project its own key
    return re.sub("<from zrproxy keygen>", lambda _: next(digests), config)


def test_the_walkthrough_names_the_variables_it_exports() -> None:
    exported = set(re.findall(r"export ([A-Z_]+)=", section()))
    named = set(re.findall(r'api_key_env = "([A-Z_]+)"', walkthrough_config()))
    assert exported == named == set(ENV_VARS)


def test_the_walkthrough_config_passes_check_config_without_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(walkthrough_config())
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    # Step 6: first without the secrets (CI), then with them.
    assert main(["check-config", "--no-env", str(path)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["check-config", str(path)]) == 2
    assert "api_key_env" in capsys.readouterr().err
    for name in ENV_VARS:
        monkeypatch.setenv(name, "sk-test")
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "3 upstreams: openai-us, openai-eu, anthropic" in captured.out
