"""What a zero-retention request may not ask for, and the endpoints that exist to store.

The one table of request fields that need provider-side state (each row citing the
provider document it comes from), the fields the proxy itself sets for zero-retention
projects, and the storing endpoints no project may reach. The README prints these
tables (`markdown_tables()`; `tests/test_readme_policy.py` checks they agree).

Never copies request content anywhere: a check returns a row of this table, whose
`param` is a fixed string, never something the client sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Payload = Mapping[str, Any]

# The OpenAI-style endpoints whose bodies carry `store` (the Responses API stores for 30
# days when it is omitted), so the proxy sets it to false for zero-retention projects.
FORCED_FIELDS: Mapping[str, Mapping[str, Any]] = {
    "/v1/responses": {"store": False},
    "/v1/chat/completions": {"store": False},
}
_NO_FORCED: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class Rule:
    """One kind of request a zero-retention project may not send."""

    provider: str  # "OpenAI" or "Anthropic", for the README
    paths: tuple[str, ...]  # the endpoints the field has this meaning on
    param: str  # fixed: the field named in the error (`param`, or in the message)
    refused_when: str  # what in the request is refused, in words
    doc_url: str
    check: Callable[[Payload], bool]


def _present(name: str) -> Callable[[Payload], bool]:
    return lambda p: p.get(name) is not None


def _is_true(name: str) -> Callable[[Payload], bool]:
    return lambda p: p.get(name) is True


def _tools(p: Payload) -> list[Mapping[str, Any]]:
    tools = p.get("tools")
    return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []


def _tool_type(*types: str) -> Callable[[Payload], bool]:
    return lambda p: "tools" in p and any(t.get("type") in types for t in _tools(p))


def _hosted_shell(p: Payload) -> bool:
    # The shell tool runs in OpenAI's container when its environment is not the local one.
    for tool in _tools(p):
        env = tool.get("environment")
        if tool.get("type") == "shell" and isinstance(env, dict) and env.get("type") != "local":
            return True
    return False


def _extended_cache(p: Payload) -> bool:
    value = p.get("prompt_cache_retention")
    # "in-memory" is the spelling the API used first, "in_memory" the current one.
    return value is not None and value not in ("in_memory", "in-memory")


def _anthropic_code_execution(p: Payload) -> bool:
    return any(str(t.get("type", "")).startswith("code_execution_") for t in _tools(p))


def _any_part(p: Payload, test: Callable[[Mapping[str, Any]], bool]) -> bool:
    """Whether `test` holds for an input item (`input`), or a content part of a message
    or item, or a block inside such a part (an Anthropic tool_result's): where file
    references can appear. Plain string content, the common case, costs one check."""
    for key in ("messages", "input"):
        items = p.get(key)
        if not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, dict):
                continue
            if test(item):
                return True
            content = item.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                if not isinstance(part, dict):
                    continue
                if test(part):
                    return True
                inner = part.get("content")
                if isinstance(inner, list):
                    for block in inner:
                        if isinstance(block, dict) and test(block):
                            return True
    return False


def _has_file_id(part: Mapping[str, Any]) -> bool:
    file = part.get("file")  # chat completions: {"type": "file", "file": {"file_id"}}
    return part.get("file_id") is not None or (
        isinstance(file, dict) and file.get("file_id") is not None
    )


def _has_file_source(part: Mapping[str, Any]) -> bool:
    source = part.get("source")
    return isinstance(source, dict) and source.get("type") == "file"


def _openai_file_id(p: Payload) -> bool:
    return _any_part(p, _has_file_id)


def _anthropic_file_source(p: Payload) -> bool:
    return _any_part(p, _has_file_source)


_RESPONSES = ("/v1/responses",)
_OPENAI_BODIES = ("/v1/responses", "/v1/chat/completions")
_MESSAGES = ("/v1/messages",)
_OPENAI_DATA = "https://platform.openai.com/docs/guides/your-data"

RULES: tuple[Rule, ...] = (
    Rule(
        "OpenAI",
        _OPENAI_BODIES,
        "store",
        "`store: true` (stored responses and chat completions)",
        "https://platform.openai.com/docs/api-reference/responses/create#responses-create-store",
        _is_true("store"),
    ),
    Rule(
        "OpenAI",
        _RESPONSES,
        "previous_response_id",
        "`previous_response_id` (continues a response stored at OpenAI)",
        "https://platform.openai.com/docs/guides/conversation-state",
        _present("previous_response_id"),
    ),
    Rule(
        "OpenAI",
        _RESPONSES,
        "conversation",
        "`conversation` (items kept in a Conversation object, without expiry)",
        "https://platform.openai.com/docs/api-reference/conversations",
        _present("conversation"),
    ),
    Rule(
        "OpenAI",
        _RESPONSES,
        "background",
        "`background: true` (the response is stored to be polled)",
        "https://platform.openai.com/docs/guides/background",
        _is_true("background"),
    ),
    Rule(
        "OpenAI",
        _RESPONSES,
        "prompt",
        "`prompt` (a prompt template stored at OpenAI)",
        "https://platform.openai.com/docs/guides/prompt-engineering#reusable-prompts",
        _present("prompt"),
    ),
    Rule(
        "OpenAI",
        _OPENAI_BODIES,
        "prompt_cache_retention",
        "`prompt_cache_retention` other than `in_memory` (extended caching: up to 24 h)",
        "https://platform.openai.com/docs/guides/prompt-caching#prompt-cache-retention",
        _extended_cache,
    ),
    Rule(
        "OpenAI",
        _OPENAI_BODIES,
        "tools.code_interpreter",
        'a `tools` entry of `type: "code_interpreter"` (runs in a hosted container)',
        "https://platform.openai.com/docs/guides/tools-code-interpreter",
        _tool_type("code_interpreter"),
    ),
    Rule(
        "OpenAI",
        _OPENAI_BODIES,
        "tools.shell",
        'a `tools` entry of `type: "shell"` with a hosted `environment` (hosted shell)',
        "https://platform.openai.com/docs/guides/tools-shell#hosted-shell-quickstart",
        _hosted_shell,
    ),
    Rule(
        "OpenAI",
        _OPENAI_BODIES,
        "tools.mcp",
        'a `tools` entry of `type: "mcp"` (sends content to a third-party MCP server)',
        "https://platform.openai.com/docs/guides/tools-remote-mcp",
        _tool_type("mcp"),
    ),
    Rule(
        "OpenAI",
        _OPENAI_BODIES,
        "file_id",
        "a `file_id` in a content part (Files API content is kept until deleted)",
        _OPENAI_DATA + "#image-and-file-inputs",
        _openai_file_id,
    ),
    Rule(
        "Anthropic",
        _MESSAGES,
        "mcp_servers",
        "`mcp_servers` (the MCP connector sends content to third-party servers)",
        "https://docs.claude.com/en/docs/agents-and-tools/mcp-connector",
        _present("mcp_servers"),
    ),
    Rule(
        "Anthropic",
        _MESSAGES,
        "tools.code_execution",
        "a `tools` entry of a `code_execution_*` type (runs in a container kept by Anthropic)",
        "https://docs.claude.com/en/docs/agents-and-tools/tool-use/code-execution-tool",
        _anthropic_code_execution,
    ),
    Rule(
        "Anthropic",
        _MESSAGES,
        "container",
        "`container` (reuses a code-execution container and its files)",
        "https://docs.claude.com/en/docs/agents-and-tools/tool-use/code-execution-tool",
        _present("container"),
    ),
    Rule(
        "Anthropic",
        _MESSAGES,
        "source.type",
        'a content block with `source.type: "file"` (Files API content is kept until deleted)',
        "https://docs.claude.com/en/docs/build-with-claude/files",
        _anthropic_file_source,
    ),
)
_RULES_BY_PATH: Mapping[str, tuple[Rule, ...]] = {
    path: tuple(r for r in RULES if path in r.paths) for r in RULES for path in r.paths
}
# Every field a refusal can name: the only label values of the refusals metric.
REFUSAL_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(r.param for r in RULES))


def conflict(path: str, payload: Payload) -> Rule | None:
    """The first rule a zero-retention request to `path` breaks, or None."""
    for rule in _RULES_BY_PATH.get(path, ()):
        if rule.check(payload):
            return rule
    return None


def forced_fields(path: str) -> Mapping[str, Any]:
    """The body fields the proxy sets on zero-retention requests to `path`."""
    return FORCED_FIELDS.get(path, _NO_FORCED)


@dataclass(frozen=True, slots=True)
class StoringEndpoint:
    """An API that exists to keep data at the provider: never proxied."""

    name: str
    pattern: str  # a regex on the request path, matched whole
    example: str  # a path it matches (the tests request every one)
    keeps: str  # what it keeps at the provider, for the README
    doc_url: str


STORING_ENDPOINTS: tuple[StoringEndpoint, ...] = (
    StoringEndpoint(
        "Files (OpenAI, Anthropic)",
        r"/v1/files(/.*)?",
        "/v1/files/file-abc/content",
        "uploaded files, until deleted",
        "https://platform.openai.com/docs/api-reference/files",
    ),
    StoringEndpoint(
        "Batches (OpenAI)",
        r"/v1/batches(/.*)?",
        "/v1/batches",
        "batch input and output files, until deleted",
        "https://platform.openai.com/docs/api-reference/batch",
    ),
    StoringEndpoint(
        "Vector stores (OpenAI)",
        r"/v1/vector_stores(/.*)?",
        "/v1/vector_stores/vs_abc/files",
        "file contents and their embeddings, until deleted",
        "https://platform.openai.com/docs/api-reference/vector-stores",
    ),
    StoringEndpoint(
        "Assistants (OpenAI)",
        r"/v1/assistants(/.*)?",
        "/v1/assistants",
        "assistant definitions and instructions, until deleted",
        "https://platform.openai.com/docs/api-reference/assistants",
    ),
    StoringEndpoint(
        "Threads (OpenAI)",
        r"/v1/threads(/.*)?",
        "/v1/threads/thread_abc/messages",
        "conversation messages, until deleted",
        "https://platform.openai.com/docs/api-reference/threads",
    ),
    StoringEndpoint(
        "Conversations (OpenAI)",
        r"/v1/conversations(/.*)?",
        "/v1/conversations/conv_abc/items",
        "conversation items, without expiry",
        "https://platform.openai.com/docs/api-reference/conversations",
    ),
    StoringEndpoint(
        "Stored responses (OpenAI)",
        r"/v1/responses/.+",
        "/v1/responses/resp_abc",
        "reads, lists or deletes responses stored for 30 days",
        "https://platform.openai.com/docs/api-reference/responses/get",
    ),
    StoringEndpoint(
        "Stored chat completions (OpenAI)",
        r"/v1/chat/completions/.+",
        "/v1/chat/completions/chatcmpl-abc/messages",
        "reads, lists or deletes stored chat completions",
        "https://platform.openai.com/docs/api-reference/chat/get",
    ),
    StoringEndpoint(
        "Message Batches (Anthropic)",
        r"/v1/messages/batches(/.*)?",
        "/v1/messages/batches/msgbatch_abc/results",
        "batch results, for 29 days",
        "https://docs.claude.com/en/docs/build-with-claude/batch-processing",
    ),
)
_STORING = re.compile("|".join(f"(?:{e.pattern})" for e in STORING_ENDPOINTS))


def is_storing_endpoint(path: str) -> bool:
    """Whether `path` is one of the storing endpoints (only asked on the 404 path)."""
    return _STORING.fullmatch(path) is not None


def markdown_tables() -> str:
    """The README's tables of refused fields and storing endpoints, from this module."""
    lines = [
        "| provider | endpoints | refused when the request has | `param` | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in RULES:
        paths = ", ".join(f"`{p}`" for p in r.paths)
        lines.append(
            f"| {r.provider} | {paths} | {r.refused_when} | `{r.param}` | [doc]({r.doc_url}) |"
        )
    lines += [
        "",
        "| storing endpoint (404 for every project) | paths | kept at the provider | source |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {e.name} | `{e.pattern}` | {e.keeps} | [doc]({e.doc_url}) |" for e in STORING_ENDPOINTS
    ]
    return "\n".join(lines) + "\n"
