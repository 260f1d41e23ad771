"""Calibration changes glibc's mmap threshold only where lowbit owns the process."""

from __future__ import annotations

import pytest

from lowbit.model import calib_memory


@pytest.fixture
def mallopt_calls(monkeypatch):
    calls = []

    def fake(name):  # record what would reach glibc instead of changing this process
        return (lambda param, value: calls.append((param, value))) if name == "mallopt" else None

    monkeypatch.setattr(calib_memory, "_libc_function", fake)
    return calls


def test_library_calls_leave_the_allocator_alone(mallopt_calls):
    with calib_memory.solve_allocations():
        pass
    assert mallopt_calls == []


def test_lowbit_processes_tune_it_around_each_solve(mallopt_calls):
    with calib_memory.allocator_tuning():
        with calib_memory.solve_allocations():
            assert mallopt_calls == [(-3, calib_memory.SOLVE_MMAP_BYTES)]
    assert mallopt_calls[-1] == (-3, calib_memory.FORWARD_MMAP_BYTES)
    with calib_memory.solve_allocations():  # the scope ended: back to leaving it alone
        pass
    assert len(mallopt_calls) == 2


def test_the_cli_runs_commands_inside_the_tuning(monkeypatch):
    from lowbit.cli import main as cli

    seen = []
    from lowbit.cli import formats_cmd

    monkeypatch.setattr(formats_cmd, "run", lambda args: seen.append(calib_memory._TUNING.get()))
    cli.main(["formats"])
    assert seen == [True] and calib_memory._TUNING.get() is False
