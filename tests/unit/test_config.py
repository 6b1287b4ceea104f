"""The config parser: every mistake names its key path and never quotes a secret."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrproxy.config import (
    Address,
    Config,
    ProjectConfig,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
    load_config,
    parse_config,
)
from zrproxy.errors import ConfigError

H1 = "a1" * 32
H2 = "b2" * 32
H3 = "C3" * 32
SECRET = "sk-THIS-IS-A-SECRET-VALUE-42"
ENV = {"OPENAI_KEY": SECRET, "ANTHROPIC_KEY": SECRET + "-anthropic"}

FULL_TOML = f"""
[server]
listen = "0.0.0.0:8443"
admin_listen = "[::1]:9191"
max_body_bytes = 2048
connect_timeout_s = 2
first_byte_timeout_s = 1.5
idle_timeout_s = 30
total_timeout_s = 120
drain_timeout_s = 10
keepalive_timeout_s = 20
mlock = true
scrub_memory = true
workers = 4

[[upstreams]]
name = "oa-eu"
kind = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_KEY"
region = "eu"
request_overrides = {{ store = false, metadata = {{ tier = "zr" }} }}

[[upstreams]]
name = "anth"
kind = "anthropic"
base_url = "http://127.0.0.1:8000"
api_key_env = "ANTHROPIC_KEY"
region = "us"

[[routes]]
model = "gpt-*"
upstreams = ["oa-eu"]

[[routes]]
name = "claude"
model = "claude-*"
upstreams = ["anth", "oa-eu"]
upstream_model = "claude-sonnet"

[[projects]]
name = "acme"
key_sha256 = ["{H1}", "{H2}"]

[[projects]]
name = "beta"
key_sha256 = ["{H3}"]
zero_retention = false
models = ["gpt-4o*", "claude-*"]
regions = ["eu"]
"""


def minimal() -> dict[str, Any]:
    """The smallest valid config, as parsed TOML."""
    return {
        "upstreams": [{"name": "up", "kind": "openai", "base_url": "http://127.0.0.1:9999/v1"}],
        "routes": [{"model": "*", "upstreams": ["up"]}],
        "projects": [{"name": "acme", "key_sha256": [H1]}],
    }


def error_of(data: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, ENV if environ is None else environ)
    return info.value


def assert_error(
    data: dict[str, Any], key_path: str, environ: dict[str, str] | None = None
) -> ConfigError:
    error = error_of(data, environ)
    assert error.key_path == key_path, str(error)
    assert str(error).startswith(f"{key_path}: ")
    assert SECRET not in str(error)
    return error


def with_(path: tuple[str | int, ...], value: Any, base: dict[str, Any] | None = None) -> Any:
    """A copy of `base` (default: minimal()) with the item at `path` set to `value`."""
    data = copy.deepcopy(base if base is not None else minimal())
    node: Any = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return data


# --- a complete config ----------------------------------------------------------------


def test_full_config_round_trips_into_dataclasses(tmp_path: Path) -> None:
    path = tmp_path / "zrproxy.toml"
    path.write_text(FULL_TOML)
    config = load_config(path, ENV)

    assert config.server == ServerConfig(
        listen=Address("0.0.0.0", 8443),
        admin_listen=Address("::1", 9191),
        max_body_bytes=2048,
        connect_timeout_s=2.0,
        first_byte_timeout_s=1.5,
        idle_timeout_s=30.0,
        total_timeout_s=120.0,
        drain_timeout_s=10.0,
        keepalive_timeout_s=20.0,
        mlock=True,
        scrub_memory=True,
        workers=4,
    )
    assert type(config.server.connect_timeout_s) is float
    assert str(config.server.admin_listen) == "[::1]:9191"

    oa, anth = config.upstreams
    assert oa == UpstreamConfig(
        name="oa-eu",
        kind="openai",
        base_url="https://api.openai.com/v1",  # trailing slash dropped
        api_key_env="OPENAI_KEY",
        api_key=SECRET,
        region="eu",
        request_overrides={"store": False, "metadata": {"tier": "zr"}},
        override_endpoints=("/v1/chat/completions", "/v1/responses"),
    )
    assert anth.kind == "anthropic"
    assert anth.override_endpoints == ("/v1/messages",)
    assert anth.api_key == ENV["ANTHROPIC_KEY"]
    assert anth.request_overrides == {}
    assert config.upstream("anth") is anth

    assert config.routes == (
        RouteConfig(name="gpt-*", model="gpt-*", upstreams=("oa-eu",)),
        RouteConfig(
            name="claude",
            model="claude-*",
            upstreams=("anth", "oa-eu"),
            upstream_model="claude-sonnet",
        ),
    )
    assert config.projects == (
        ProjectConfig(name="acme", key_sha256=(bytes.fromhex(H1), bytes.fromhex(H2))),
        ProjectConfig(
            name="beta",
            key_sha256=(bytes.fromhex(H3),),
            zero_retention=False,
            models=("gpt-4o*", "claude-*"),
            regions=("eu",),
        ),
    )


def test_minimal_config_takes_the_defaults() -> None:
    config = parse_config(minimal(), {})
    assert config.server == ServerConfig()
    assert config.server.listen == Address("127.0.0.1", 8080)
    assert config.server.admin_listen == Address("127.0.0.1", 9090)
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    assert config.server.workers == 1
    assert (config.server.mlock, config.server.scrub_memory) == (False, False)
    (upstream,) = config.upstreams
    assert (upstream.api_key_env, upstream.api_key, upstream.region) == (None, None, None)
    (route,) = config.routes
    assert route.name == "*" and route.upstream_model is None
    (project,) = config.projects
    assert project.zero_retention is True
    assert project.models is None and project.regions is None


def test_config_dataclasses_are_frozen() -> None:
    config = parse_config(minimal(), {})
    targets: list[tuple[object, str, object]] = [
        (config, "routes", ()),
        (config.server, "listen", Address("0.0.0.0", 1)),
        (config.server.listen, "port", 1),
        (config.upstreams[0], "api_key", "x"),
        (config.routes[0], "model", "x"),
        (config.projects[0], "zero_retention", False),
    ]
    for obj, name, value in targets:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)


def test_repr_never_shows_the_api_key() -> None:
    data = with_(("upstreams", 0, "api_key_env"), "OPENAI_KEY")
    config = parse_config(data, ENV)
    assert config.upstreams[0].api_key == SECRET
    assert SECRET not in repr(config.upstreams[0])
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert "OPENAI_KEY" in repr(config.upstreams[0])  # the variable's name is fine


# --- unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key_path"),
    [
        (("colour",), "colour"),
        (("server", "colour"), "server.colour"),
        (("upstreams", 0, "colour"), "upstreams[0].colour"),
        (("routes", 0, "colour"), "routes[0].colour"),
        (("projects", 0, "colour"), "projects[0].colour"),
    ],
)
def test_unknown_key_is_named(path: tuple[str | int, ...], key_path: str) -> None:
    base = minimal()
    base["server"] = {}
    error = assert_error(with_(path, 1, base), key_path)
    assert error.problem == "unknown key"


def test_api_key_itself_is_not_a_config_key() -> None:
    # Keys come from the environment; a pasted secret is refused without being echoed.
    error = assert_error(with_(("upstreams", 0, "api_key"), SECRET), "upstreams[0].api_key")
    assert error.problem.startswith("unknown key")


def test_unknown_key_in_second_upstream() -> None:
    data = minimal()
    data["upstreams"].append({"name": "b", "kind": "openai", "base_url": "http://b", "x": 1})
    assert_error(data, "upstreams[1].x")


# The keys each table accepts: the dataclass fields, less those that are not config
# keys (UpstreamConfig.api_key is resolved from api_key_env; Config's tables are named
# in the plural). Derived, so a new key can't be "unknown" here by accident.
_KNOWN = {
    "": {"server", "upstreams", "routes", "projects", "subprocessors", "audit", "limits"},
    "server": {f.name for f in dataclasses.fields(ServerConfig)},
    "upstreams[0]": {f.name for f in dataclasses.fields(UpstreamConfig)} - {"api_key"},
    "routes[0]": {f.name for f in dataclasses.fields(RouteConfig)},
    "projects[0]": {f.name for f in dataclasses.fields(ProjectConfig)},
}
_WHERE: dict[str, tuple[str | int, ...]] = {
    "": (),
    "server": ("server",),
    "upstreams[0]": ("upstreams", 0),
    "routes[0]": ("routes", 0),
    "projects[0]": ("projects", 0),
}


@settings(max_examples=200, deadline=None)
@given(
    where=st.sampled_from(sorted(_WHERE)),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none()),
        min_size=1,
        max_size=4,
    ),
)
def test_any_unknown_extra_key_is_rejected_by_name(where: str, extra: dict[str, Any]) -> None:
    extra = {k: v for k, v in extra.items() if k not in _KNOWN[where]}
    if not extra:
        return
    data = minimal()
    data["server"] = {}
    node: Any = data
    for step in _WHERE[where]:
        node = node[step]
    node.update({k: 0 if v is None else v for k, v in extra.items()})
    error = error_of(data, {})
    prefix = f"{where}." if where else ""
    assert error.problem.startswith("unknown key")
    assert error.key_path in {prefix + k for k in extra}


# --- wrong types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "key_path"),
    [
        (("server", "max_body_bytes"), "1024", "server.max_body_bytes"),
        (("server", "max_body_bytes"), True, "server.max_body_bytes"),
        (("server", "max_body_bytes"), 1024.0, "server.max_body_bytes"),
        (("server", "max_body_bytes"), 0, "server.max_body_bytes"),
        (("server", "max_body_bytes"), -5, "server.max_body_bytes"),
        (("server", "workers"), True, "server.workers"),
        (("server", "workers"), "2", "server.workers"),
        (("server", "connect_timeout_s"), "5", "server.connect_timeout_s"),
        (("server", "connect_timeout_s"), True, "server.connect_timeout_s"),
        (("server", "idle_timeout_s"), 0, "server.idle_timeout_s"),
        (("server", "total_timeout_s"), float("inf"), "server.total_timeout_s"),
        (("server", "drain_timeout_s"), float("nan"), "server.drain_timeout_s"),
        (("server", "mlock"), 1, "server.mlock"),
        (("server", "scrub_memory"), "true", "server.scrub_memory"),
        (("server", "listen"), 8080, "server.listen"),
        (("server",), [], "server"),
        (("server",), "x", "server"),
        (("upstreams",), {"name": "up"}, "upstreams"),
        (("upstreams", 0), ["name"], "upstreams[0]"),
        (("upstreams", 0, "name"), 5, "upstreams[0].name"),
        (("upstreams", 0, "name"), "", "upstreams[0].name"),
        (("upstreams", 0, "name"), "has space", "upstreams[0].name"),
        (("upstreams", 0, "kind"), True, "upstreams[0].kind"),
        (("upstreams", 0, "region"), 3, "upstreams[0].region"),
        (("upstreams", 0, "request_overrides"), ["store"], "upstreams[0].request_overrides"),
        (("routes",), {"model": "*"}, "routes"),
        (("routes", 0, "upstreams"), "up", "routes[0].upstreams"),
        (("routes", 0, "upstreams"), [], "routes[0].upstreams"),
        (("routes", 0, "upstreams"), ["up", 1], "routes[0].upstreams[1]"),
        (("routes", 0, "model"), 1, "routes[0].model"),
        (("routes", 0, "model"), "x" * 201, "routes[0].model"),
        (("projects", 0, "key_sha256"), H1, "projects[0].key_sha256"),
        (("projects", 0, "zero_retention"), 0, "projects[0].zero_retention"),
        (("projects", 0, "models"), "gpt-*", "projects[0].models"),
        (("projects", 0, "models"), ["gpt-*", False], "projects[0].models[1]"),
        (("projects", 0, "regions"), {"eu": True}, "projects[0].regions"),
    ],
)
def test_wrong_type_names_the_key(path: tuple[str | int, ...], value: Any, key_path: str) -> None:
    base = minimal()
    base["server"] = {}
    assert_error(with_(path, value, base), key_path)


@pytest.mark.parametrize(
    ("section", "key_path"),
    [("upstreams", "upstreams"), ("routes", "routes"), ("projects", "projects")],
)
def test_each_section_is_required(section: str, key_path: str) -> None:
    data = minimal()
    del data[section]
    assert_error(data, key_path)
    data[section] = []
    assert_error(data, key_path)


@pytest.mark.parametrize(
    ("path", "key_path"),
    [
        (("upstreams", 0, "name"), "upstreams[0].name"),
        (("upstreams", 0, "kind"), "upstreams[0].kind"),
        (("upstreams", 0, "base_url"), "upstreams[0].base_url"),
        (("routes", 0, "model"), "routes[0].model"),
        (("routes", 0, "upstreams"), "routes[0].upstreams"),
        (("projects", 0, "name"), "projects[0].name"),
        (("projects", 0, "key_sha256"), "projects[0].key_sha256"),
    ],
)
def test_missing_required_key_is_named(path: tuple[str | int, ...], key_path: str) -> None:
    data = minimal()
    node: Any = data
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    error = assert_error(data, key_path)
    assert error.problem == "is required"


# --- addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["localhost", "127.0.0.1", "127.0.0.1:70000", "127.0.0.1:", ":8080", "::1:80"]
)
def test_bad_listen_address(listen: str) -> None:
    assert_error(with_(("server",), {"listen": listen}), "server.listen")
    assert_error(with_(("server",), {"admin_listen": listen}), "server.admin_listen")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("[::1]:80", Address("::1", 80)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("localhost:65535", Address("localhost", 65535)),
    ],
)
def test_good_listen_address(text: str, address: Address) -> None:
    config = parse_config(with_(("server",), {"listen": text}), {})
    assert config.server.listen == address


def test_listen_and_admin_listen_must_differ() -> None:
    data = with_(("server",), {"listen": "127.0.0.1:8000", "admin_listen": "127.0.0.1:8000"})
    assert_error(data, "server.admin_listen")
    # Port 0 twice is two different random ports.
    parse_config(with_(("server",), {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}), {})


# --- references and duplicates --------------------------------------------------------


def test_undefined_upstream_in_route() -> None:
    error = assert_error(
        with_(("routes", 0, "upstreams"), ["up", "nope"]), "routes[0].upstreams[1]"
    )
    assert "nope" in error.problem


def test_duplicate_upstream_names() -> None:
    data = minimal()
    data["upstreams"].append({"name": "up", "kind": "anthropic", "base_url": "http://x"})
    assert_error(data, "upstreams[1].name")


def test_duplicate_route_names() -> None:
    data = minimal()
    data["routes"] = [
        {"name": "r", "model": "a-*", "upstreams": ["up"]},
        {"name": "r", "model": "b-*", "upstreams": ["up"]},
    ]
    assert_error(data, "routes[1].name")
    # Without names, the glob is the name: the same glob twice is a duplicate too.
    data["routes"] = [{"model": "a-*", "upstreams": ["up"]}, {"model": "a-*", "upstreams": ["up"]}]
    assert_error(data, "routes[1].name")


def test_duplicate_project_names() -> None:
    data = minimal()
    data["projects"].append({"name": "acme", "key_sha256": [H2]})
    assert_error(data, "projects[1].name")


def test_duplicate_key_hash_across_projects() -> None:
    data = minimal()
    # The same digest in upper case is the same key.
    data["projects"].append({"name": "other", "key_sha256": [H2, H1.upper()]})
    error = assert_error(data, "projects[1].key_sha256[1]")
    assert "acme" in error.problem


@pytest.mark.parametrize("digest", ["a" * 63, "a" * 65, "g" * 64, "0x" + "a" * 62, ""])
def test_key_sha256_must_be_64_hex(digest: str) -> None:
    assert_error(with_(("projects", 0, "key_sha256"), [H2, digest]), "projects[0].key_sha256[1]")


def test_regions_must_name_an_upstream_region() -> None:
    data = with_(("upstreams", 0, "region"), "eu")
    parse_config(with_(("projects", 0, "regions"), ["eu"], data), {})
    error = assert_error(
        with_(("projects", 0, "regions"), ["eu", "us"], data), "projects[0].regions[1]"
    )
    assert "us" in error.problem
    # No upstream has a region at all.
    assert_error(with_(("projects", 0, "regions"), ["eu"]), "projects[0].regions[0]")


# --- upstreams ------------------------------------------------------------------------


def test_missing_env_var_names_the_variable_not_a_value() -> None:
    data = with_(("upstreams", 0, "api_key_env"), "ZR_TEST_MISSING_KEY")
    error = assert_error(data, "upstreams[0].api_key_env")
    assert "ZR_TEST_MISSING_KEY" in error.problem
    for value in ENV.values():
        assert value not in str(error)
    # Set but empty counts as missing.
    assert_error(data, "upstreams[0].api_key_env", {"ZR_TEST_MISSING_KEY": ""})


def test_env_var_is_read_from_the_given_environ_only() -> None:
    data = with_(("upstreams", 0, "api_key_env"), "PATH")
    assert_error(data, "upstreams[0].api_key_env", {})
    assert parse_config(data, {"PATH": "k"}).upstreams[0].api_key == "k"


@pytest.mark.parametrize("kind", ["OpenAI", "azure", "", "anthropic "])
def test_bad_kind(kind: str) -> None:
    assert_error(with_(("upstreams", 0, "kind"), kind), "upstreams[0].kind")


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1?key=" + SECRET,
        "https://api.example.com/v1#frag",
        "ftp://api.example.com/v1",
        "api.example.com/v1",
        "http://",
        "https://api example.com",
    ],
)
def test_bad_base_url(url: str) -> None:
    assert_error(with_(("upstreams", 0, "base_url"), url), "upstreams[0].base_url")


@pytest.mark.parametrize("key", ["model", "stream", "messages"])
def test_protected_request_overrides(key: str) -> None:
    data = with_(("upstreams", 0, "request_overrides"), {"store": False, key: "x"})
    assert_error(data, f"upstreams[0].request_overrides.{key}")


# --- files ----------------------------------------------------------------------------


def test_invalid_toml_reports_position_not_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[server]\nlisten = "127.0.0.1:8080"\napi_key = {SECRET}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert info.value.key_path == str(path)
    assert "line 3, column" in message
    assert SECRET not in message
    assert "api_key" not in message


def test_invalid_toml_at_end_of_document(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'secret = ["{SECRET}"')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "end of document" in info.value.problem
    assert SECRET not in str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'x = "\xff' + SECRET.encode() + b'"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "not valid TOML" in info.value.problem
    assert SECRET not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", {})
    assert "cannot read" in info.value.problem


def test_load_config_names_the_key_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL_TOML.replace("workers = 4", "workers = 4\nworker = 5"))
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert info.value.key_path == "server.worker"


def test_parse_config_returns_a_config() -> None:
    assert isinstance(parse_config(minimal(), {}), Config)


def test_overrides_go_only_to_the_endpoints_that_take_them() -> None:
    data = minimal()
    data["upstreams"][0]["request_overrides"] = {"store": False}
    upstream = parse_config(data, {}).upstreams[0]
    # By default the generation endpoints only: embeddings would reject `store`.
    assert upstream.overrides_for("/v1/responses") == {"store": False}
    assert upstream.overrides_for("/v1/chat/completions") == {"store": False}
    for path in ("/v1/embeddings", "/v1/completions", "/v1/moderations"):
        assert upstream.overrides_for(path) == {}
    data["upstreams"][0]["override_endpoints"] = ["/v1/embeddings"]
    upstream = parse_config(data, {}).upstreams[0]
    assert upstream.overrides_for("/v1/embeddings") == {"store": False}
    assert upstream.overrides_for("/v1/responses") == {}


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/nothing", "/v1/chat/completions/"])
def test_override_endpoints_must_be_the_kinds_own(path: str) -> None:
    data = minimal()
    data["upstreams"][0]["override_endpoints"] = ["/v1/responses", path]
    with pytest.raises(ConfigError) as info:
        parse_config(data, {})
    assert info.value.key_path == "upstreams[0].override_endpoints[1]"


def test_tls_files_are_checked_at_load(tmp_path: Any) -> None:
    data = minimal()
    data["upstreams"][0]["base_url"] = "https://models.internal/v1"
    data["upstreams"][0]["ca_file"] = str(tmp_path / "missing.pem")
    assert error_of(data).key_path == "upstreams[0].ca_file"
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    data["upstreams"][0]["ca_file"] = str(pem)
    assert parse_config(data, {}).upstreams[0].ca_file == str(pem)
    data["upstreams"][0]["client_cert_file"] = str(pem)  # without its key
    assert error_of(data).key_path == "upstreams[0].client_cert_file"
    data["upstreams"][0]["client_key_file"] = str(pem)
    assert parse_config(data, {}).upstreams[0].client_key_file == str(pem)
    data["upstreams"][0]["base_url"] = "http://models.internal/v1"  # no TLS to apply them to
    assert error_of(data).key_path == "upstreams[0].base_url"


@pytest.mark.parametrize(
    "url", ["proxy:3128", "https://proxy:3128", "http://user:pw@proxy:3128", "http://proxy"]
)
def test_egress_proxy_must_be_http_host_port(url: str) -> None:
    data = minimal()
    data["server"] = {"egress_proxy": url}
    error = error_of(data)
    assert error.key_path == "server.egress_proxy"
    assert "pw" not in str(error)
    data = minimal()
    data["upstreams"][0]["egress_proxy"] = url
    assert error_of(data).key_path == "upstreams[0].egress_proxy"


def test_egress_proxy_of_the_upstream_wins() -> None:
    data = minimal()
    data["server"] = {"egress_proxy": "http://proxy:3128"}
    data["upstreams"][0]["egress_proxy"] = "http://other:8080"
    config = parse_config(data, {})
    assert config.server.egress_proxy == "http://proxy:3128"
    assert config.upstreams[0].egress_proxy == "http://other:8080"
