"""Fault-injection tests: a summary table of every scenario (requests, 5xx, recovery) after the run."""

from __future__ import annotations

import fault_helpers


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not fault_helpers.TALLIES:
        return
    terminalreporter.section("fault injection: requests sent, 5xx seen, time until recovery")
    for t in fault_helpers.TALLIES:
        terminalreporter.write_line(t.line())
