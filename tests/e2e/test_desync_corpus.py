"""The http-desync-guardian corpus, each case as raw bytes to the real proxy.

Severe cases must be refused (400, connection closed) and never reach the upstream;
Compliant cases must be served (answered by our handler, not refused by the parser);
Acceptable and Ambiguous cases are either served, with at most one request upstream, or
refused like a Severe one. The corpus lives in `../shared/corpora/` beside the repository
(`ZRPROXY_SHARED_DIR` overrides where `shared/` is); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.conftest import Mock, RunningProxy, StartProxy

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ZRPROXY_SHARED_DIR", REPO / ".." / "shared"))
CORPUS = SHARED / "corpora" / "http-desync-guardian"
FILES = sorted(p.name for p in CORPUS.glob("*.yaml")) if CORPUS.is_dir() else []
BODY = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
# Compliant cases our server refuses, on purpose, with 501 (RFC 9112 6.1: a transfer
# coding the server does not understand; nginx answers 501 too) and the connection
# closed: it decodes no transfer coding but `chunked` alone. A body in a coding (gzip,
# deflate, compress) or with coding parameters is one the proxy could not forward
# faithfully: the upstream APIs take no transfer coding, and decoding (compress has no
# decoder in the standard library) would add a decompression-bomb bound for no client
# that exists. aiohttp's server served the two `..., chunked` cases by ignoring the other
# codings: it forwarded a gzip body as if plain.
REFUSED_COMPLIANT = {
    "Correct TE OK": "gzip, chunked",
    "Different Transfer-Encoding headers combined": "gzip, deflate, identity, compress, chunked",
    "Transfer-Encoding: identity and chunked OK": "deflate, identity, chunked",
    "Different Transfer-Encoding headers": "gzip / deflate / identity / chunked, as fields",
    "Transfer-Encoding with a param: chunked;custom_param": "codings with parameters",
    "Multiple transfer encoding headers in a single request OK": "codings as several fields",
    "TE with custom parameters OK": "chunked with parameters",
}
_PARSER_REFUSALS = {
    "bad_http_request",
    "request_header_fields_too_large",
    "uri_too_long",
    "unsupported_transfer_coding",
}


def _bytes(value: object) -> bytes:
    text = "" if value is None else str(value)
    try:
        return text.encode("latin-1")  # "\xff" in the YAML is the byte 0xff
    except UnicodeEncodeError:
        return text.encode("utf-8")


def raw_request(case: dict[str, Any], key: str, keep_uri: bool) -> bytes:
    """The case's request line and headers, our credentials, and a chat body framed the
    way the case's own Content-Length or chunked Transfer-Encoding says."""
    version = _bytes(case["version"])
    target = _bytes(case["uri"]) if keep_uri else b"/v1/chat/completions"
    line = _bytes(case["method"]) + b" " + target + (b" " + version if version else b"")
    fields, names, chunked, length = [], set(), False, None
    for header in case.get("headers") or []:
        name, value = _bytes(header["name"]), _bytes(header["value"])
        fields.append(name + b": " + value)
        names.add(name.strip().lower())
        if b"transfer-encoding" in name.lower() and b"chunked" in value.lower():
            chunked = True
        if name.strip().lower() == b"content-length" and length is None:
            digits = value.strip().split(b",")[0].strip()
            length = int(digits) if digits.isdigit() else None
    if b"host" not in names:
        fields.append(b"Host: x")
    fields.append(b"Authorization: Bearer " + key.encode())
    if chunked:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    elif length is None:
        body = b""
    elif length <= 8 * 1024 * 1024:
        body = BODY[:length] + b" " * (length - len(BODY))  # JSON allows trailing spaces
    else:
        body = BODY
    return line + b"\r\n" + b"\r\n".join(fields) + b"\r\n\r\n" + body


async def _exchange(proxy: RunningProxy, raw: bytes, head_only: bool) -> tuple[int, str, bool]:
    """(status, error code or "", closed by the proxy) for one raw request."""
    address = proxy.service.api_address
    assert address is not None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        body = b""
        if match and not head_only:
            body = await asyncio.wait_for(reader.readexactly(int(match.group(1))), 20)
        code = re.search(rb'"code":"([a-z_]+)"', body)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
        except TimeoutError:
            closed = False
        except ConnectionError:
            closed = True
        return status, code.group(1).decode() if code else "", closed
    finally:
        writer.close()


@pytest.mark.skipif(not FILES, reason=f"corpus not found at {CORPUS} (shared/ beside the repo)")
@pytest.mark.parametrize("filename", FILES)
async def test_desync_corpus(filename: str, mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy([{"name": "mock", "kind": "openai", "base_url": mock.url}])
    cases = yaml.safe_load((CORPUS / filename).read_text(encoding="utf-8")) or []
    problems: list[str] = []
    for case in cases:
        tier = case["expected"]["tier"]
        before = mock.stats.started
        raw = raw_request(case, proxy.key, keep_uri=filename.startswith("uri"))
        status, code, closed = await _exchange(proxy, raw, case["method"] == "HEAD")
        forwarded = mock.stats.started - before
        refused = (status == 400 and code in _PARSER_REFUSALS) or code in _PARSER_REFUSALS
        name = case["name"]
        if tier == "Severe" or (tier == "Compliant" and name in REFUSED_COMPLIANT):
            expected = 501 if name in REFUSED_COMPLIANT else 400
            if not (refused and status == expected and closed and forwarded == 0):
                problems.append(f"{tier} {name!r}: {status} {code} closed={closed} up={forwarded}")
        elif tier == "Compliant":
            if refused:
                problems.append(f"Compliant {name!r} refused: {status} {code}")
        elif refused:
            if not (closed and forwarded == 0):
                problems.append(f"{tier} {name!r} refused but closed={closed} up={forwarded}")
        elif forwarded > 1:
            problems.append(f"{tier} {name!r}: {forwarded} upstream requests")
    assert problems == []


def test_the_corpus_has_every_tier() -> None:
    if not FILES:
        pytest.skip(f"corpus not found at {CORPUS} (shared/ beside the repo)")
    tiers = {
        case["expected"]["tier"]
        for name in FILES
        for case in yaml.safe_load((CORPUS / name).read_text(encoding="utf-8")) or []
    }
    assert {"Severe", "Compliant", "Acceptable", "Ambiguous"} <= tiers
