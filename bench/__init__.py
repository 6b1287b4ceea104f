"""The zrproxy benchmark (`python -m bench`): prints numbers, asserts nothing."""
