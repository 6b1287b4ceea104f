"""zrproxy: a zero-retention streaming reverse proxy for LLM APIs."""
