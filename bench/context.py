"""What every scenario gets: the targets (direct, nginx, zrproxy, ...), the mock, the key,
and the run's budget (full or --quick)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.servers import Server


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes. `proxy` is None for direct-to-mock."""

    name: str
    host: str
    port: int
    proxy: Server | None


@dataclass(slots=True)
class Context:
    tmp: Path  # the run's scratch directory (configs, logs)
    out: Path  # the results directory
    key: str
    key_sha256: str
    mock: Server
    targets: list[Target]
    quick: bool
    fd_limit: int  # RLIMIT_NOFILE of this process and the processes it starts

    def budget(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def pick(self, *names: str) -> list[Target]:
        """The running targets among `names`, in that order."""
        return [t for name in names for t in self.targets if t.name == name]
