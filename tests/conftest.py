"""Shared pytest configuration: fixtures live in tests/support/ modules, registered here."""

pytest_plugins = [
    "tests.support.registries",
    "tests.support.images",
    "tests.support.cluster",
    "tests.support.afslet",
    "tests.support.fanotify",
    "tests.support.internet",
]
