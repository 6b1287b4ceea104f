"""`python -m zrproxy`: the same entry point as the `zrproxy` console script."""

from zrproxy.cli import run

run()
