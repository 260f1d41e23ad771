"""Kernel choice by measurement (kernels/autotune.py): the per-machine cache, the overrides,
and that a forced choice really switches the path that runs."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import lowbit.runtime  # noqa: F401  (registers the step probe, as any use of the runtime does)
from lowbit.kernels import assume_cpu, autotune, native, probe, selected_kernel
from lowbit.kernels._common import KernelError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir, a quiet-machine threshold that accepts any timing, a count of
    measurements; this process's choices forgotten before and after."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(probe, "NOISY", float("inf"))
    monkeypatch.setattr(probe, "BUSY", float("inf"))
    calls = []
    real = probe.measure

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(probe, "measure", counted)
    autotune.reset()
    yield tmp_path, calls
    autotune.reset()


def test_measured_once_then_read_back(cache):
    tmp, calls = cache
    first = autotune.measured()
    assert not first["cached"] and len(calls) == 1
    if first["noise"] < 2 and first["load"] < 1.5:  # short on a quiet machine (~1 s)
        assert first["seconds"] < 5, first["seconds"]
    path = tmp / autotune.CACHE_NAME
    data = json.loads(path.read_text())
    assert [entry["key"] for entry in data.values()] == [autotune.machine_key()]
    assert not list(tmp.glob("*.json.*")) and len(list(tmp.glob("*.json"))) == 1  # renamed
    for name, cands in autotune.DECISIONS.items():
        assert sorted(first["ranking"][name]) == sorted(cands)
    autotune.reset()
    again = autotune.measured()
    assert again["cached"] and len(calls) == 1
    assert again["ranking"] == first["ranking"]


def test_isa_caps_are_part_of_the_machine_key(monkeypatch):
    """A torch capped at AVX2 (ATEN_CPU_CAPABILITY) times differently: its own cache entry."""
    for name in autotune.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    plain = autotune.machine_key()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = autotune.machine_key()
    assert capped["isa_caps"] == {"ATEN_CPU_CAPABILITY": "avx2"} and plain["isa_caps"] == {}
    assert autotune._key_id(capped) != autotune._key_id(plain)


def test_corrupt_or_foreign_cache_is_measured_again(cache):
    tmp, calls = cache
    path = tmp / autotune.CACHE_NAME
    path.write_text("{not json")
    assert not autotune.measured()["cached"] and len(calls) == 1
    assert json.loads(path.read_text())  # rewritten, valid
    data = json.loads(path.read_text())  # an entry whose rankings are garbage
    for entry in data.values():
        entry["ranking"]["decode.w8a8"] = ["bogus"]
    path.write_text(json.dumps(data))
    autotune.reset()
    assert not autotune.measured()["cached"] and len(calls) == 2
    for entry in data.values():  # a noisy entry is measured again too
        entry["ranking"]["decode.w8a8"] = list(autotune.DECISIONS["decode.w8a8"])
        entry["noisy"] = True
    path.write_text(json.dumps(data))
    autotune.reset()
    assert not autotune.measured()["cached"] and len(calls) == 3


def test_busy_machine_keeps_only_clear_wins(cache, monkeypatch):
    tmp, calls = cache
    monkeypatch.setattr(probe, "BUSY", -1.0)  # every run counts as busy
    monkeypatch.setattr(probe, "MARGIN", float("inf"))  # and no win is clear enough
    entry = autotune.measured()
    assert entry["noisy"] and not entry["cached"]
    for name in autotune.DECISIONS:
        if name != "compute":
            assert entry["ranking"][name] == autotune.flag_ranking(name), name
    autotune.reset()
    assert not autotune.measured()["cached"] and len(calls) == 2  # measured again


def test_measured_choice_is_the_fastest_candidate(cache):
    entry = autotune.measured()
    table = entry["table"]
    for name in ("decode.int8_weight", "decode.w8a8", "prefill.int8_weight"):
        totals = {c: probe.total(table, name, c) for c in table[name]}
        assert entry["ranking"][name][0] == min(totals, key=totals.get)
        assert autotune.choice(name) == entry["ranking"][name][0]


def test_assume_cpu_follows_flags_without_measuring(cache):
    _, calls = cache
    with assume_cpu(native_bf16=False, vnni=False):
        assert autotune.by_flags()
        assert autotune.choice("prefill.int8_weight") == "fp32"
        assert autotune.choice("decode.w8a8", skip=("native",)) == "fp32_gemm"
    with assume_cpu(native_bf16=True, vnni=True):
        assert autotune.choice("decode.int8_weight") == "int8pack_mm"
        assert autotune.choice("prefill.w8a8") == "int_mm"
    assert not calls


def _run(code: str, **env) -> str:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_environment_overrides(tmp_path):
    code = ("import torch; from lowbit.kernels import autotune, native, selected_kernel;"
            "x = torch.zeros(1, 8); print(selected_kernel('int8_weight', x),"
            "selected_kernel('int8_weight', torch.zeros(64, 8)),"
            "(autotune.cache_path()).exists())")
    out = _run(code, LOWBIT_CPU="avx2", LOWBIT_CACHE=str(tmp_path)).split()
    decode = "native_avx2_gemv" if native.available() else "int8pack_mm"
    assert out == [f"int8_weight.{decode}", "int8_weight.widen_fp32_linear", "False"]
    out = _run(code, LOWBIT_CPU="avx512_bf16", LOWBIT_CACHE=str(tmp_path)).split()
    assert out == ["int8_weight.int8pack_mm", "int8_weight.widen_bf16_linear", "False"]
    if native.available():  # LOWBIT_NATIVE=1 wins over flags that say torch's kernel
        out = _run(code, LOWBIT_CPU="avx512_bf16", LOWBIT_NATIVE="1",
                   LOWBIT_CACHE=str(tmp_path)).split()
        assert out[0] == "int8_weight.native_avx2_gemv"


def test_forcing_switches_the_path():
    x1, x64 = torch.zeros(1, 8), torch.zeros(64, 8)
    with autotune.forcing({"prefill.int8_weight": "bf16"}):
        assert selected_kernel("int8_weight", x64) == "int8_weight.widen_bf16_linear"
    with autotune.forcing({"prefill.int4_weight": "fp32"}):
        assert selected_kernel("int4_weight", x64) == "int4_weight.dequant_fp32_linear"
    with native.force(False):
        for path, kernel in (("int_mm", "int_mm"), ("fp32_gemm", "fp32_gemm")):
            with autotune.forcing({"decode.w8a8": path}):
                assert selected_kernel("int8_dynamic", x1) == f"int8_dynamic.{kernel}"
    with autotune.forcing({"prefill.w8a8": "fp32_gemm"}):
        assert selected_kernel("int8_static", x64) == "int8_static.fp32_gemm"
    with pytest.raises(KernelError, match="unknown kernel choice"):
        with autotune.forcing({"decode.w8a8": "magic"}):
            pass


def test_force_is_scoped_per_thread_and_restored():
    outer = native.forced()
    seen = []
    with native.force(True):
        def other():
            seen.append(native.forced())
            with native.force(False):
                seen.append(native.forced())

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert native.forced() is True
        with native.force(False):
            assert native.forced() is False
        assert native.forced() is True
    assert native.forced() is outer
    assert seen == [None, False]  # a new thread starts from the default, not from ours


def test_bench_times_each_candidate():
    calls = {"a": 0, "b": 0}

    def make(name):
        def f(n):
            calls[name] += n
        return f

    times = autotune.bench({"a": make("a"), "b": make("b")}, rounds=3, number=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 7, "b": 7}  # warm-up + 3 rounds of 2, interleaved
