"""Which upstreams may serve a (project, model) pair, in failover order.

Everything that can be precomputed from the config is, at start-up. Per request: the
project's model allowlist (one compiled glob, if it has one), then the routes' globs in
config order until one matches, then one dict lookup for the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zrproxy.config import Config, ProjectConfig, RouteConfig, UpstreamConfig, glob_matcher
from zrproxy.errors import ModelNotAllowed, NotFound, NoUpstreamInRegion


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
        raise NotFound()

    def visible_models(self, project: ProjectConfig) -> list[str]:
        """Models this project may use, for GET /v1/models: route model names (globs as
        written) inside the project's allowlist, and the allowlist's plain model names
        that some route serves."""
        allowed = self._allowed.get(project.name)
        visible = [
            route.model
            for _, route in self._routes
            if (allowed is None or allowed(route.model))
            and self._plans[project.name, route.name].upstreams
        ]
        for model in project.models or ():
            if not any(c in model for c in "*?[") and model not in visible:
                route = next((r for matches, r in self._routes if matches(model)), None)
                if route is not None and self._plans[project.name, route.name].upstreams:
                    visible.append(model)
        return visible
