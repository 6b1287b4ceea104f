"""Which upstreams may serve a (project, model) pair, in failover order.

Everything that can be precomputed from the config is, at start-up: the region and
zero-retention filters give each (project, route) its fixed list of upstreams. Per
request: the project's model allowlist (one compiled glob, if it has one), then the
routes' globs in config order until one matches, then one dict lookup for the plan.
What changes with the calendar (a subprocessor announced for a later day) is one date
per plan compared with a cached "today", looked up at most once a minute.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from zrproxy.config import (
    Config,
    ProjectConfig,
    RouteConfig,
    UpstreamConfig,
    activation_dates,
    glob_matcher,
    is_glob,
)
from zrproxy.errors import (
    ModelNotAllowed,
    ModelNotFound,
    NoUpstreamInRegion,
    UpstreamNotYetActive,
    ZeroRetentionUnavailable,
)

Exclusion = Literal["region", "zero_retention"]


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


class DayClock:
    """Today's date (UTC), asked of `today` at most once per `recheck_s` of `monotonic`."""

    __slots__ = ("_day", "_monotonic", "_next", "_recheck_s", "_today")

    def __init__(
        self,
        today: Callable[[], datetime.date] = utc_today,
        recheck_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._today = today
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._next = monotonic() + recheck_s
        self._day = today()

    def day(self) -> datetime.date:
        now = self._monotonic()
        if now >= self._next:
            self._next = now + self._recheck_s
            self._day = self._today()
        return self._day


@dataclass(frozen=True, slots=True)
class RouteAccess:
    """What one project may use of one route, and why the rest is excluded."""

    usable: tuple[UpstreamConfig, ...]
    excluded: tuple[tuple[UpstreamConfig, Exclusion], ...]

    @property
    def in_regions(self) -> bool:
        return bool(self.usable) or any(why == "zero_retention" for _, why in self.excluded)


def route_access(config: Config, project: ProjectConfig, route: RouteConfig) -> RouteAccess:
    """The route's upstreams this project may be sent to (in failover order): those in
    its regions and, for a zero-retention project, with `zero_data_retention = true`."""
    usable: list[UpstreamConfig] = []
    excluded: list[tuple[UpstreamConfig, Exclusion]] = []
    for name in route.upstreams:
        upstream = config.upstream(name)
        if project.regions is not None and upstream.region not in project.regions:
            excluded.append((upstream, "region"))
        elif project.zero_retention and not upstream.zero_data_retention:
            excluded.append((upstream, "zero_retention"))
        else:
            usable.append(upstream)
    return RouteAccess(tuple(usable), tuple(excluded))


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request goes: the route, and the upstreams to try in order."""

    route: RouteConfig
    upstreams: tuple[UpstreamConfig, ...]
    # The day from which every upstream here is in use (date.min: already all of them).
    complete_from: datetime.date = datetime.date.min
    refusal: type[NoUpstreamInRegion | ZeroRetentionUnavailable] | None = None
    # Per endpoint path, the upstreams above that serve it (their kind has it), in the
    # same order: an endpoint is only ever sent to an upstream that has it (an Azure
    # deployment has no /v1/responses). Filled in __post_init__.
    by_endpoint: Mapping[str, tuple[UpstreamConfig, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        paths = {p for u in self.upstreams for p in u.endpoints}
        split = {p: tuple(u for u in self.upstreams if p in u.endpoints) for p in paths}
        object.__setattr__(self, "by_endpoint", split)


class Router:
    def __init__(self, config: Config, clock: DayClock | None = None) -> None:
        self._routes = [(glob_matcher((r.model,)), r) for r in config.routes]
        self._allowed: dict[str, Callable[[str], bool]] = {
            p.name: glob_matcher(p.models) for p in config.projects if p.models
        }
        self._clock = clock if clock is not None else DayClock()
        self._activation = activation_dates(config)
        self._plans: dict[tuple[str, str], Plan] = {}
        for project in config.projects:
            for route in config.routes:
                access = route_access(config, project, route)
                refusal = (
                    None
                    if access.usable
                    else ZeroRetentionUnavailable
                    if access.in_regions
                    else NoUpstreamInRegion
                )
                starts = [self._activation[u.name] for u in access.usable]
                self._plans[project.name, route.name] = Plan(
                    route, access.usable, max(starts, default=datetime.date.min), refusal
                )
        # Plans cut down to the upstreams already in use, for the day they were cut on.
        self._cut_day = datetime.date.min
        self._cut: dict[tuple[str, str], Plan] = {}

    def plan(self, project: ProjectConfig, model: str) -> Plan:
        allowed = self._allowed.get(project.name)
        if allowed is not None and not allowed(model):
            raise ModelNotAllowed()
        for matches, route in self._routes:
            if matches(model):
                plan = self._plans[project.name, route.name]
                if plan.refusal is not None:
                    raise plan.refusal()
                if plan.complete_from > datetime.date.min:
                    day = self._clock.day()
                    if plan.complete_from > day:
                        return self._in_use(project.name, route.name, plan, day)
                return plan
        raise ModelNotFound()

    def serves(self, project: ProjectConfig, model: str) -> bool:
        """Whether a request from `project` for `model` would be routed somewhere."""
        allowed = self._allowed.get(project.name)
        if allowed is not None and not allowed(model):
            return False
        route = next((r for matches, r in self._routes if matches(model)), None)
        if route is None:
            return False
        plan = self._plans[project.name, route.name]
        return plan.refusal is None and bool(plan.upstreams)

    def _in_use(self, project: str, route: str, plan: Plan, day: datetime.date) -> Plan:
        """`plan` without the upstreams whose subprocessor is announced for after `day`."""
        if day != self._cut_day:
            self._cut_day, self._cut = day, {}
        cut = self._cut.get((project, route))
        if cut is None:
            upstreams = tuple(u for u in plan.upstreams if self._activation[u.name] <= day)
            cut = self._cut[project, route] = Plan(plan.route, upstreams, plan.complete_from)
        if not cut.upstreams:
            raise UpstreamNotYetActive()
        return cut

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
