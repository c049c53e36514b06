"""Shared pytest fixtures. Area-specific fixtures live in each test directory's conftest.py."""

from __future__ import annotations

import pytest

from support.procs import start_emulator


@pytest.fixture
def emulator():
    """A fresh Ollama emulator process on a free loopback port (function scope: no shared state)."""
    proc = start_emulator()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def module_emulator():
    """One emulator per test module, for read-mostly tests; reset it if you change knobs."""
    proc = start_emulator()
    yield proc
    proc.stop()
