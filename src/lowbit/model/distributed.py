"""Sweeps on Ray: independent cells (bench rows, sensitivity units, ``auto:<bpw>`` candidate
scores) run as Ray tasks, on a local Ray cluster or on the cluster at an address.

Ray is optional (``pip install 'lowbit[distributed]'``); without it every sweep runs serially.
A task receives little: names, paths, recipe strings, indices, a few token ids. Each worker
loads the model itself by name or path (``load_model``, from the same cache) and keeps it for
its next cells (``remember``); no model is ever pickled to a worker. On a cluster of several
machines every node needs lowbit installed and the same model paths and text files.

``run_cells`` reports each cell as it finishes, with the node that ran it. A cell whose
worker dies (a crash, the OOM killer, a lost node) is retried ``retries`` times, then
reported failed; the other cells keep their results. An exception raised by a cell's own
code is re-raised in the caller, as the serial run would.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from collections.abc import Callable, Sequence

from lowbit.errors import LowbitError

__all__ = ["INSTALL", "DistributedError", "fingerprint", "in_worker", "node", "ray_address",
           "ray_installed", "remember", "run_cells", "start"]

INSTALL = "pip install 'lowbit[distributed]'"
LOCAL = "local"  # --ray without an address: a Ray cluster on this machine (ray.init())
ENV = "LOWBIT_RAY"  # default for --ray: "local" or an address
CONNECT_TIMEOUT_S = 5.0
#: test-only: "<cell label>" makes that cell's worker process exit at once (a real death);
#: "<cell label>@<file>" only while <file> does not exist (it is created: the retry runs)
DIE_HOOK = "LOWBIT_TEST_DIE_IN_CELL"

_in_worker = False
_memory: dict = {}


class DistributedError(LowbitError, RuntimeError):
    """Ray is missing, unreachable or cannot run the sweep; the message names the fix."""


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def ray_address(option: str | bool | None = None) -> str | None:
    """Where a sweep runs: ``option`` (``--ray [ADDRESS]``; True or "local": a local cluster),
    else ``$LOWBIT_RAY``, else None (serially, in this process). Inside a Ray task it is
    always None: cells do not fan out again."""
    if _in_worker:
        return None
    if option is True:
        return LOCAL
    if option:
        return str(option)
    return os.environ.get(ENV) or None


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise DistributedError(f"--ray needs Ray, which is not installed: {INSTALL} (or run "
                               "without --ray: the cells then run one after another)") from exc
    return ray


def _check_reachable(address: str, timeout: float) -> None:
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise DistributedError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, "
                               "the address `ray start --head` prints); pass --ray alone for a "
                               "local cluster")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise DistributedError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}, waited up to "
            f"{timeout:g} s): start one there with `ray start --head --port={port}`, fix the "
            "address, or pass --ray alone for a local cluster") from exc


def start(address: str | None = LOCAL, *, num_cpus: int | None = None,
          timeout: float = CONNECT_TIMEOUT_S):
    """Connect this process to Ray (``ray.init``) and return the ``ray`` module.

    ``address`` None or "local": a local cluster (``num_cpus`` of this machine, default all);
    "auto": the cluster started on this machine by ``ray start``; otherwise ``HOST:PORT`` (or
    ``ray://HOST:PORT``), which must answer within ``timeout`` seconds (Ray itself would retry
    for minutes). Reuses the connection this process already has, whatever the address."""
    ray = _import_ray()
    local = address in (None, "", LOCAL)
    if not local and address != "auto":
        _check_reachable(address, timeout)
    if ray.is_initialized():  # (an address is still checked: a typo is not silently ignored)
        return ray
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False,
                    "configure_logging": False}
    if local:
        kwargs["num_cpus"] = num_cpus
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray cluster" if local else f"the Ray cluster at {address}"
        raise DistributedError(f"could not start or join {where}: {exc}. Check `ray status`, "
                               "or run without --ray") from exc
    return ray


def in_worker() -> bool:
    """True inside a Ray task run by ``run_cells``."""
    return _in_worker


def node() -> dict:
    """Which machine and process ran a cell: ``{"hostname", "node_id", "pid"}`` (``node_id``
    is Ray's, None outside Ray)."""
    node_id = None
    if _in_worker:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    return {"hostname": socket.gethostname(), "node_id": node_id, "pid": os.getpid()}


def remember(key, build: Callable, keep: int = 2):
    """What ``build()`` returns, kept per worker process under ``key`` (the ``keep`` most
    recent keys): a worker loads a model once for all the cells it runs."""
    if key in _memory:
        _memory[key] = _memory.pop(key)  # most recent last
        return _memory[key]
    while len(_memory) >= keep:
        _memory.pop(next(iter(_memory)))
    _memory[key] = value = build()
    return value


def fingerprint(model) -> str:
    """A digest of every tensor's name, shape, dtype and sum: a worker checks that the model
    it loaded by name is the one the caller holds."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(repr(float(t.double().sum())).encode())
    return h.hexdigest()[:16]


def _die_now(hook: str) -> None:
    _, _, marker = hook.partition("@")
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()  # noqa: SIM115 - the retry finds it and runs
    os._exit(3)


def _task(fn: Callable, cell, hook: str | None, threads: int | None, *shared):
    global _in_worker
    _in_worker = True
    if hook:
        _die_now(hook)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(cell, *shared), node()


def run_cells(fn: Callable, cells: Sequence, labels: Sequence[str], *, shared: tuple = (),
              on_done: Callable, threads: int | None = None, retries: int = 1) -> None:
    """Run ``fn(cell, *shared)`` for every cell as a Ray task (``start`` first).

    ``fn`` must be a module-level function (Ray ships it by reference); ``shared`` is put in
    Ray's object store once. Each task reserves ``threads`` CPUs (default 1) and runs torch on
    that many threads. ``on_done(index, result, node, error)`` is called in this process as
    each cell finishes: ``error`` is None, or why the cell failed after ``retries`` retries
    (its worker died). An exception raised by ``fn`` cancels the rest and is raised here."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    hook = os.environ.get(DIE_HOOK, "")
    refs = [ray.put(s) for s in shared]
    remote = ray.remote(num_cpus=threads or 1, max_retries=retries)(_task)
    pending = {remote.remote(fn, cell, hook if hook.partition("@")[0] == label else None,
                             threads, *refs): i
               for i, (cell, label) in enumerate(zip(cells, labels, strict=True))}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                result, where = ray.get(ready[0])
            except RayTaskError as exc:  # the cell's own code raised: as a serial run would
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise cause from None
            except RayError as exc:  # its worker or node died, retries spent
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                on_done(i, None, None, f"{type(exc).__name__} after {retries} retr"
                        f"{'y' if retries == 1 else 'ies'}: {reason}")
                continue
            on_done(i, result, where, None)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
