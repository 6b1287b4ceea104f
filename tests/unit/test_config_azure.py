"""Config of kind `azure_openai`: `api_version` required and checked, `deployments`, the
endpoints an Azure deployment has, and what check-config says about its base_url."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.processes import to_toml
from zrproxy.checks import config_warnings
from zrproxy.cli import main
from zrproxy.config import parse_config
from zrproxy.errors import ConfigError, ConfigErrors

H = "ab" * 32


def data(**upstream: Any) -> dict[str, Any]:
    azure = {
        "name": "azure",
        "kind": "azure_openai",
        "base_url": "https://contoso-eu.openai.azure.com",
        "api_key_env": "AZURE_OPENAI_KEY",
        "api_version": "2024-10-21",
        **upstream,
    }
    return {
        "server": {},
        "upstreams": [{k: v for k, v in azure.items() if v is not None}],
        "routes": [{"model": "*", "upstreams": ["azure"]}],
        "projects": [{"name": "acme", "key_sha256": [H]}],
    }


ENV = {"AZURE_OPENAI_KEY": "k"}


def error_of(config: dict[str, Any]) -> ConfigError:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        parse_config(config, ENV)
    error = info.value
    if isinstance(error, ConfigErrors):
        assert len(error.errors) == 1, error.errors
        return error.errors[0]
    return error


def test_an_azure_upstream_parses_with_its_keys() -> None:
    config = parse_config(data(deployments={"gpt-4o": "prod-gpt4o"}), ENV)
    azure = config.upstreams[0]
    assert (azure.kind, azure.dialect, azure.api_version) == (
        "azure_openai",
        "openai",
        "2024-10-21",
    )
    assert azure.deployments == {"gpt-4o": "prod-gpt4o"}
    assert azure.endpoints == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert azure.override_endpoints == ("/v1/chat/completions",)


def test_an_azure_upstream_without_api_version_names_the_key() -> None:
    error = error_of(data(api_version=None))
    assert error.key_path == "upstreams[0].api_version"
    assert "required" in error.problem


@pytest.mark.parametrize("version", ["latest", "2024-10", "v1", "2024-10-21; x", 20241021])
def test_a_malformed_api_version_is_refused(version: object) -> None:
    assert error_of(data(api_version=version)).key_path == "upstreams[0].api_version"


def test_a_preview_api_version_is_accepted() -> None:
    parse_config(data(api_version="2025-04-01-preview"), ENV)


@pytest.mark.parametrize("key", ["api_version", "deployments"])
def test_azure_keys_on_another_kind_are_refused(key: str) -> None:
    value = "2024-10-21" if key == "api_version" else {"gpt-4o": "d"}
    config = data(kind="openai", base_url="https://api.openai.com/v1", api_version=None)
    config["upstreams"][0][key] = value
    error = error_of(config)
    assert error.key_path == f"upstreams[0].{key}"
    assert "azure_openai" in error.problem


@pytest.mark.parametrize("deployment", ["a/b", "x?y", "", "-lead", "a b"])
def test_a_deployment_name_that_cannot_be_a_path_segment_is_refused(deployment: str) -> None:
    error = error_of(data(deployments={"gpt-4o": deployment}))
    assert error.key_path == "upstreams[0].deployments.gpt-4o"
    assert deployment not in error.problem or not deployment


def test_overrides_only_on_endpoints_azure_has() -> None:
    error = error_of(data(override_endpoints=["/v1/responses"]))
    assert error.key_path == "upstreams[0].override_endpoints[0]"


def test_the_azure_key_header_is_the_proxys() -> None:
    error = error_of(data(header_overrides={"api-key": "x"}))
    assert error.key_path == "upstreams[0].header_overrides.api-key"


def test_check_config_on_azure_base_urls() -> None:
    clean = parse_config(data(), ENV)
    assert [w for w in config_warnings(clean, 4) if w.key_path.startswith("upstreams")] == []
    doubled = parse_config(data(base_url="https://contoso.openai.azure.com/openai"), ENV)
    keys = [w.key_path for w in config_warnings(doubled, 4)]
    assert "upstreams[0].base_url" in keys
    keyless = parse_config(data(api_key_env=None), {})
    keys = [w.key_path for w in config_warnings(keyless, 4)]
    assert "upstreams[0]" in keys  # a provider host without api_key_env


def test_check_config_warns_about_store_on_azure() -> None:
    config = parse_config(data(request_overrides={"store": False}), ENV)
    keys = [w.key_path for w in config_warnings(config, 4)]
    assert "upstreams[0].request_overrides.store" in keys


def test_check_config_names_the_missing_api_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data(api_version=None)))
    assert main(["check-config", "--no-env", str(path)]) != 0
    captured = capsys.readouterr()
    assert "upstreams[0].api_version" in captured.out + captured.err
