"""Authenticator (keys to projects) and Router (project + model to upstreams)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from zrproxy.auth import Authenticator, new_key, presented_key
from zrproxy.config import Config, ProjectConfig, parse_config
from zrproxy.errors import ConfigError, InvalidAuth, ModelNotAllowed, NotFound, NoUpstreamInRegion
from zrproxy.routing import Router


def headers(**items: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in items.items()}))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def projects(*entries: tuple[str, list[str]]) -> tuple[ProjectConfig, ...]:
    return tuple(
        ProjectConfig(name, tuple(bytes.fromhex(digest(k)) for k in keys)) for name, keys in entries
    )


# --- keys -----------------------------------------------------------------------------


def test_new_key_is_random_and_its_digest_matches() -> None:
    key, hexdigest = new_key()
    other, _ = new_key()
    assert key.startswith("zr-") and len(key) == len("zr-") + 43  # 32 bytes, base64url
    assert key != other
    assert hexdigest == digest(key)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"Authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer   k1  "}, "k1"),
        ({"AUTHORIZATION": "BEARER k1"}, "k1"),
        ({"x-api-key": "k1"}, "k1"),
        ({"X-Api-Key": " k1 "}, "k1"),
        ({"Authorization": "Basic azE6"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer   "}, None),
        ({"Authorization": ""}, None),
        ({"x-api-key": ""}, None),
        ({"x-api-key": "   "}, None),
        ({}, None),
        # An Authorization header that is not a bearer token is not silently bypassed.
        ({"Authorization": "Basic azE6", "x-api-key": "k1"}, None),
    ],
)
def test_presented_key(given: dict[str, str], expected: str | None) -> None:
    assert presented_key(CIMultiDictProxy(CIMultiDict(given))) == expected


def test_authenticate_with_bearer_and_x_api_key() -> None:
    auth = Authenticator(projects(("acme", ["k-acme"]), ("beta", ["k-beta"])))
    assert auth.authenticate(headers(Authorization="Bearer k-acme")).name == "acme"
    assert auth.authenticate(headers(x_api_key="k-beta")).name == "beta"
    assert auth.authenticate(headers(x_api_key="k-acme")).name == "acme"


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer "},
        {"Authorization": "Token k-acme"},
        {"Authorization": "Basic k-acme"},
        {"Authorization": "Bearer k-acm"},
        {"Authorization": "Bearer K-ACME"},
        {"Authorization": "Bearer k-acme2"},
        {"x-api-key": ""},
        {"x-api-key": "unknown"},
        {"x-api-key": digest("k-acme")},  # the digest itself is not a key
        {"x-api-key": "k-\udcff"},  # not encodable as UTF-8
    ],
)
def test_invalid_auth(given: dict[str, str]) -> None:
    auth = Authenticator(projects(("acme", ["k-acme"])))
    with pytest.raises(InvalidAuth) as info:
        auth.authenticate(CIMultiDictProxy(CIMultiDict(given)))
    assert info.value.status == 401
    for value in given.values():
        if value.strip():
            assert value not in str(info.value)


def test_key_rotation_two_hashes_for_one_project() -> None:
    auth = Authenticator(projects(("acme", ["old-key", "new-key"]), ("beta", ["b"])))
    assert auth.authenticate(headers(Authorization="Bearer old-key")).name == "acme"
    assert auth.authenticate(headers(Authorization="Bearer new-key")).name == "acme"
    # Retiring the old key: the same project without its hash.
    auth = Authenticator(projects(("acme", ["new-key"]), ("beta", ["b"])))
    assert auth.authenticate(headers(Authorization="Bearer new-key")).name == "acme"
    with pytest.raises(InvalidAuth):
        auth.authenticate(headers(Authorization="Bearer old-key"))


def test_authenticator_from_parsed_config() -> None:
    key, hexdigest = new_key()
    config = parse_config(
        {
            "upstreams": [{"name": "u", "kind": "openai", "base_url": "http://u"}],
            "routes": [{"model": "*", "upstreams": ["u"]}],
            "projects": [{"name": "acme", "key_sha256": [hexdigest.upper()]}],
        },
        {},
    )
    auth = Authenticator(config.projects)
    assert auth.authenticate(headers(Authorization=f"Bearer {key}")) is config.projects[0]


# --- routing --------------------------------------------------------------------------


def routing_config(**project: Any) -> Config:
    return parse_config(
        {
            # Region routing here (all upstreams keep nothing); zero-retention filtering
            # is tested in test_zero_retention.py.
            "upstreams": [
                {**u, "zero_data_retention": True}
                for u in (
                    {"name": "oa-eu", "kind": "openai", "base_url": "http://a", "region": "eu"},
                    {"name": "oa-us", "kind": "openai", "base_url": "http://b", "region": "us"},
                    {
                        "name": "anth-us",
                        "kind": "anthropic",
                        "base_url": "http://c",
                        "region": "us",
                    },
                    {"name": "local", "kind": "openai", "base_url": "http://d"},
                )
            ],
            "routes": [
                {"name": "gpt4o", "model": "gpt-4o*", "upstreams": ["oa-eu", "oa-us"]},
                {"name": "gpt", "model": "gpt-*", "upstreams": ["oa-us", "oa-eu"]},
                {"name": "claude", "model": "claude-*", "upstreams": ["anth-us"]},
                {"name": "local", "model": "local-?", "upstreams": ["local"]},
            ],
            "projects": [
                {"name": "open", "key_sha256": ["0" * 64]},
                {"name": "p", "key_sha256": ["1" * 64], **project},
            ],
        },
        {},
    )


def plan_names(router: Router, project: ProjectConfig, model: str) -> tuple[str, list[str]]:
    plan = router.plan(project, model)
    return plan.route.name, [u.name for u in plan.upstreams]


def test_routes_are_matched_in_order_by_glob() -> None:
    config = routing_config()
    router = Router(config)
    open_ = config.projects[0]
    assert plan_names(router, open_, "gpt-4o-mini") == ("gpt4o", ["oa-eu", "oa-us"])
    assert plan_names(router, open_, "gpt-4o") == ("gpt4o", ["oa-eu", "oa-us"])
    assert plan_names(router, open_, "gpt-3.5-turbo") == ("gpt", ["oa-us", "oa-eu"])
    assert plan_names(router, open_, "claude-sonnet-4") == ("claude", ["anth-us"])
    assert plan_names(router, open_, "local-1") == ("local", ["local"])
    plan = router.plan(open_, "claude-x")
    assert plan.upstreams == (config.upstream("anth-us"),)


@pytest.mark.parametrize("model", ["gpt4", "GPT-4o", "local-12", "local-", "xgpt-4", "", "claude"])
def test_no_route_is_not_found(model: str) -> None:
    config = routing_config()
    with pytest.raises(NotFound):
        Router(config).plan(config.projects[0], model)


def test_project_model_allowlist() -> None:
    config = routing_config(models=["gpt-4o*", "local-?"])
    router = Router(config)
    project = config.projects[1]
    assert plan_names(router, project, "gpt-4o-mini")[0] == "gpt4o"
    assert plan_names(router, project, "local-2")[0] == "local"
    for model in ("gpt-3.5-turbo", "claude-sonnet-4", "nothing-routes-this"):
        with pytest.raises(ModelNotAllowed):
            router.plan(project, model)
    # The allowlist of one project does not restrict another.
    assert plan_names(router, config.projects[0], "claude-x")[0] == "claude"


def test_region_filtering() -> None:
    config = routing_config(regions=["us"])
    router = Router(config)
    project = config.projects[1]
    assert plan_names(router, project, "gpt-4o") == ("gpt4o", ["oa-us"])
    assert plan_names(router, project, "gpt-5") == ("gpt", ["oa-us"])
    assert plan_names(router, project, "claude-x") == ("claude", ["anth-us"])
    # "local" has no region, so a region-restricted project may not use it.
    with pytest.raises(NoUpstreamInRegion):
        router.plan(project, "local-1")
    # Unrestricted projects still get every upstream.
    assert plan_names(router, config.projects[0], "gpt-4o") == ("gpt4o", ["oa-eu", "oa-us"])


def test_region_filtering_eu() -> None:
    config = routing_config(regions=["eu"])
    router = Router(config)
    project = config.projects[1]
    assert plan_names(router, project, "gpt-4o") == ("gpt4o", ["oa-eu"])
    with pytest.raises(NoUpstreamInRegion):
        router.plan(project, "claude-x")


def test_visible_models_lists_only_ids_a_client_can_pick() -> None:
    # Globs are never listed; a route's `models` are, and so is a route model that is
    # not a glob and the allowlist's plain ids, each only where a request would be served.
    def listed(routes: dict[str, list[str]], **project: Any) -> list[str]:
        config = routing_config(**project)
        config = parse_config(
            {
                "upstreams": [dataclass_dict(u) for u in config.upstreams],
                "routes": [
                    {"name": r.name, "model": r.model, "upstreams": list(r.upstreams)}
                    | ({"models": routes[r.name]} if r.name in routes else {})
                    for r in config.routes
                ],
                "projects": [
                    {"name": "open", "key_sha256": ["0" * 64]},
                    {"name": "p", "key_sha256": ["1" * 64], **project},
                ],
            },
            {},
        )
        return Router(config).visible_models(config.projects[1])

    assert listed({}) == []
    ids = {"gpt4o": ["gpt-4o", "gpt-4o-mini"], "gpt": ["gpt-5", "gpt-4o-x"], "claude": ["claude-x"]}
    # gpt-4o-x is listed by "gpt" but routed by the earlier "gpt4o": still servable.
    assert listed(ids) == ["gpt-4o", "gpt-4o-mini", "gpt-5", "gpt-4o-x", "claude-x"]
    assert listed(ids, regions=["eu"]) == ["gpt-4o", "gpt-4o-mini", "gpt-5", "gpt-4o-x"]
    # A narrower allowlist glob keeps the ids it matches (it used to drop them).
    assert listed(ids, models=["gpt-4o-*"]) == ["gpt-4o-mini", "gpt-4o-x"]
    # Plain allowlist ids that some route serves are listed; unserved ones are not.
    assert listed({}, models=["local-1", "claude-y", "nothing"]) == ["local-1", "claude-y"]


def dataclass_dict(upstream: Any) -> dict[str, Any]:
    out = {"name": upstream.name, "kind": upstream.kind, "base_url": upstream.base_url}
    out["zero_data_retention"] = True
    return out | ({"region": upstream.region} if upstream.region else {})


@pytest.mark.parametrize("bad", ["gpt-*", "claude-x"])
def test_route_models_must_be_concrete_ids_the_route_matches(bad: str) -> None:
    data: dict[str, Any] = {
        "upstreams": [{"name": "a", "kind": "openai", "base_url": "http://a"}],
        "routes": [{"model": "gpt-*", "upstreams": ["a"], "models": ["gpt-4o", bad]}],
        "projects": [{"name": "p", "key_sha256": ["0" * 64]}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, {})
    assert info.value.key_path == "routes[0].models[1]"
    assert bad not in str(info.value)
