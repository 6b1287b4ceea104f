"""Finding live Python objects that hold a byte or text marker (test helper)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterable

_TEXT = (str, bytes, bytearray, memoryview)


def _contains(obj: object, needles: tuple[bytes, str]) -> bool:
    if isinstance(obj, str):
        return needles[1] in obj
    if isinstance(obj, bytes | bytearray):
        return needles[0] in obj
    if isinstance(obj, memoryview):
        try:
            return needles[0] in obj.tobytes()
        except (ValueError, TypeError):
            return False
    return False


def live_holders(marker_parts: Iterable[str], *, collect: bool) -> list[str]:
    """Describe every live str/bytes/bytearray/memoryview holding the marker.

    The marker is passed in parts and joined here, so the needle itself is the only
    object that holds it on our side (and is excluded). str and bytes are not tracked by
    the gc, so they are found as referents of the tracked containers that hold them
    (frames, dicts, lists, instances, ...).
    """
    if collect:
        gc.collect()
    text = "".join(marker_parts)
    needles = (text.encode(), text)
    seen: set[int] = {id(needles), id(needles[0]), id(needles[1])}
    found: list[str] = []
    objects = gc.get_objects()
    seen.add(id(objects))
    for container in objects:
        for obj in (container, *gc.get_referents(container)):
            if id(obj) in seen or not isinstance(obj, _TEXT):
                continue
            seen.add(id(obj))
            if _contains(obj, needles):
                found.append(
                    f"{type(obj).__name__} of {len(obj)} held by {_describe(container)}"  # type: ignore[arg-type]
                )
    del objects
    return found


def _describe(container: object) -> str:
    """A container and, one level up, what holds it: enough to find the culprit."""
    name = type(container).__name__
    if name == "frame":
        code = container.f_code  # type: ignore[attr-defined]
        return f"frame {code.co_name} ({code.co_filename.rsplit('/', 1)[-1]})"
    holders = [
        type(h).__name__ if type(h).__name__ != "frame" else f"frame {h.f_code.co_name}"
        for h in gc.get_referrers(container)[:6]
        if type(h).__name__ != "list" or len(h) < 1000  # skip gc.get_objects() itself
    ]
    return f"{name} <- {holders}"


def referrer_chain(obj: object, depth: int = 4) -> str:  # pragma: no cover - debugging aid
    """Who holds `obj` (for a failing test's message)."""
    lines = []
    frontier = [obj]
    for level in range(depth):
        nxt = []
        for item in frontier:
            for ref in gc.get_referrers(item):
                if ref is frontier or ref is sys._getframe():
                    continue
                lines.append("  " * level + type(ref).__name__)
                nxt.append(ref)
        frontier = nxt[:5]
    return "\n".join(lines)
