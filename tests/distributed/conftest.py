"""A real local Ray cluster with 2 worker CPUs, started once per test module and shut
down after it (its workers hold torch and a model: not kept for the rest of the suite).
Tests that need it skip, with the reason, when Ray is not installed (``pip install
'lowbit[distributed]'``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

RAY_MISSING = importlib.util.find_spec("ray") is None
needs_ray = pytest.mark.skipif(RAY_MISSING, reason="Ray is not installed: "
                               "pip install 'lowbit[distributed]' runs these tests")
TINY = {"window": 32, "n_windows": 2, "speed": False, "threads": 1}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny models, one torch thread (the Ray tasks then reserve one CPU each); no
    ``$LOWBIT_RAY`` from the environment."""
    monkeypatch.delenv("LOWBIT_RAY", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def same_numbers(row: dict) -> dict:
    """A bench row without what differs between two runs of the same cell (times, node)."""
    return {k: v for k, v in row.items() if k not in ("seconds", "quantize_s", "eval_s", "node")}
