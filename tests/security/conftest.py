"""Fixtures of the security tests: the tiny model and bundle of the server tests, served over real loopback."""

from tests.server.conftest import bundle_path, make_engine  # noqa: F401  (fixtures reused as they are)
