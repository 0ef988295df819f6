"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py (pytest plugins)."""

pytest_plugins = [
    "tests.fixtures.stack",
    "tests.fixtures.data",
    "tests.fixtures.ingest",
    "tests.fixtures.kube",
    "tests.fixtures.registry",
    "tests.fixtures.model",
    "tests.fixtures.serving",
    "tests.fixtures.schemas",
    "tests.fixtures.images",
]
