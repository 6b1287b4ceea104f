"""Telling a provider's "unknown URL" 404 from its "no such model" 404, on the providers'
real bodies (tests/fakes.py): only the latter is the client's to see."""

from __future__ import annotations

import pytest

from tests.fakes import (
    ANTHROPIC_MODEL_404,
    ANTHROPIC_UNKNOWN_URL_404,
    AZURE_DEPLOYMENT_404,
    AZURE_UNKNOWN_URL_404,
    OPENAI_MODEL_404,
    OPENAI_UNKNOWN_URL_404,
    OPENAI_UNKNOWN_URL_CODE_404,
)
from zrproxy.dialects import Kind, names_a_model


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", OPENAI_MODEL_404),
        ("azure_openai", OPENAI_MODEL_404),
        ("azure_openai", AZURE_DEPLOYMENT_404),
        ("anthropic", ANTHROPIC_MODEL_404),
        ("anthropic", b'{"type":"error","error":{"type":"not_found_error","message":"x"}}'),
    ],
)
def test_model_404s(kind: Kind, body: bytes) -> None:
    assert names_a_model(kind, body)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", OPENAI_UNKNOWN_URL_404),
        ("openai", OPENAI_UNKNOWN_URL_CODE_404),
        ("azure_openai", AZURE_UNKNOWN_URL_404),
        ("anthropic", ANTHROPIC_UNKNOWN_URL_404),
        ("anthropic", OPENAI_MODEL_404),  # an OpenAI server behind an Anthropic base_url
        ("openai", ANTHROPIC_MODEL_404),
        ("openai", b"<html>404 Not Found</html>"),
        ("openai", b""),
        ("openai", b'{"error":"not found"}'),
        ("anthropic", b"[" * 100_000),  # too deep for the parser: still an answer
    ],
)
def test_anything_else_means_the_endpoint_is_not_there(kind: Kind, body: bytes) -> None:
    assert not names_a_model(kind, body)
