"""Which upstreams may serve a (project, model) pair, in failover order.

Everything that can be precomputed from the config is, at start-up; per request the
project's allowlist and the routes' globs are matched, first match wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zrproxy.config import (
    Config,
    ProjectConfig,
    RouteConfig,
    UpstreamConfig,
    glob_matcher,
    is_glob,
)
from zrproxy.errors import ModelNotAllowed, ModelNotFound, NoUpstreamInRegion


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request goes: the route, and the upstreams to try in order."""

    route: RouteConfig
    upstreams: tuple[UpstreamConfig, ...]


class Router:
    def __init__(self, config: Config) -> None:
        self._routes = [(glob_matcher((r.model,)), r) for r in config.routes]
        self._allowed: dict[str, Callable[[str], bool]] = {
            p.name: glob_matcher(p.models) for p in config.projects if p.models
        }
        # A route's upstreams as each project may use them (region allowlist applied).
        self._plans: dict[tuple[str, str], Plan] = {}
        for project in config.projects:
            for route in config.routes:
                upstreams = tuple(
                    config.upstream(name)
                    for name in route.upstreams
                    if project.regions is None or config.upstream(name).region in project.regions
                )
                self._plans[project.name, route.name] = Plan(route, upstreams)
        self._config = config

    def plan(self, project: ProjectConfig, model: str) -> Plan:
        allowed = self._allowed.get(project.name)
        if allowed is not None and not allowed(model):
            raise ModelNotAllowed()
        for matches, route in self._routes:
            if matches(model):
                plan = self._plans[project.name, route.name]
                if not plan.upstreams:
                    raise NoUpstreamInRegion()
                return plan
        raise ModelNotFound()

    def serves(self, project: ProjectConfig, model: str) -> bool:
        """Whether a request from `project` for `model` would be routed somewhere."""
        allowed = self._allowed.get(project.name)
        if allowed is not None and not allowed(model):
            return False
        route = next((r for matches, r in self._routes if matches(model)), None)
        return route is not None and bool(self._plans[project.name, route.name].upstreams)

    def visible_models(self, project: ProjectConfig) -> list[str]:
        """Model ids this project can pick, for GET /v1/models: each route's `models` (or
        its model, when that is not a glob), and the allowlist's plain ids, each listed
        only if a request for it would be served (allowlist, first matching route,
        upstreams left for this project). Globs are never listed: a client can't send one."""
        candidates: list[str] = []
        for _, route in self._routes:
            candidates.extend(route.models or (() if is_glob(route.model) else (route.model,)))
        candidates.extend(m for m in project.models or () if not is_glob(m))
        return [m for m in dict.fromkeys(candidates) if self.serves(project, m)]

    def listed_model(self, project: ProjectConfig, model: str) -> str | None:
        """The config's own string for `model` if GET /v1/models lists it for `project`
        (so an answer never echoes what the client sent), else None."""
        return next((m for m in self.visible_models(project) if m == model), None)
