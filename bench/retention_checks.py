"""`python -m bench.retention_checks`: what the zero-retention request checks cost.

Per request of a zero-retention project the proxy runs `retention_rules.conflict` on
the parsed body and adds `store: false` to chat and responses bodies. This prints, for
chat bodies of a few sizes, the best of several runs of each step next to the JSON parse
the proxy does anyway. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from zrproxy.dialects import UpstreamBodies, parse_request
from zrproxy.retention_rules import conflict, forced_fields

_PATH = "/v1/chat/completions"


def _best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def _row(messages: int) -> str:
    body = json.dumps(
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "x" * 100}] * messages,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        }
    ).encode()
    parsed = parse_request(body)
    forced = forced_fields(_PATH)
    n = max(200, 20000 // messages)
    parse = _best_us(lambda: parse_request(body), n)
    check = _best_us(lambda: conflict(_PATH, parsed.payload), n)
    zr = _best_us(
        lambda: UpstreamBodies(body, parsed, None, False, forced).for_upstream("openai", {}), n
    )
    plain = _best_us(
        lambda: UpstreamBodies(body, parsed, None, False).for_upstream("openai", {}), n
    )
    return f"{messages:8d}  {len(body):10d}  {parse:8.2f}  {check:11.2f}  {zr:8.2f}  {plain:8.2f}"


def main() -> None:
    print("messages  body_bytes  parse_us  conflict_us  store_us  as_is_us")
    for messages in (1, 20, 200):
        print(_row(messages))


if __name__ == "__main__":
    main()
