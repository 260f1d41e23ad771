"""Building the native libraries: no compiler -> a warning and a note in the quantize
summary; the solvers' loops in their own portable library; ``lowbit kernels``."""

import json
import shutil
import warnings

import pytest
import torch
from torch import nn

from lowbit.cli.main import main
from lowbit.kernels import autotune, native, native_solve, probe

has_cc = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache and a process that has built nothing yet; both forgotten after."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    native.reset()
    autotune.reset()
    yield tmp_path
    native.reset()
    autotune.reset()


def test_no_compiler_warns_once_and_the_summary_says_so(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    with pytest.warns(native.NativeUnavailableWarning, match="install gcc or set CC"):
        assert not native.available()
    assert "no-such-cc" in native.why_unavailable()
    assert "no-such-cc" in native.build_failure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second library or call stays quiet
        assert native.solve_library() is None
        assert not native.available()
        assert not native.preferred("int8_weight")
    from lowbit.model import quantize

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    with native.force(False):  # torch's kernels, whatever this machine measured
        quantize(model, "w8", progress=False)
    text = "\n".join(model.lowbit_summary.lines())
    assert "int8_weight.int8pack_mm" in text and "native_avx2" not in text
    assert "native        unavailable" in text and "no-such-cc" in text
    x = torch.randn(3, 64)
    assert model(x).shape == (3, 32)


@pytest.mark.skipif(not has_cc, reason="needs a C compiler")
def test_solve_library_is_separate_and_portable(fresh, monkeypatch):
    assert not any(flag.startswith("-m") for flag in native.SOLVE_FLAGS)
    assert "-mavx2" in native.FLAGS
    lib = native.solve_library()
    assert lib is not None, native.why_unavailable(solve=True)
    built = sorted(p.name for p in (fresh / "native").glob("*.so"))
    assert len(built) == 1 and built[0].startswith("lowbit-solve-")
    # a CPU without AVX2: the decode kernels are off, the solvers' loops still run
    monkeypatch.setattr(native, "_cpu_has_avx2_fma", lambda: False)
    native.reset()
    assert not native.available() and "AVX2" in native.why_unavailable()
    assert native.solve_library() is not None
    assert native_solve.usable(torch.zeros(2, 2))


def test_kernels_command_json(fresh, monkeypatch, capsys):
    monkeypatch.setattr(probe, "NOISY", float("inf"))
    monkeypatch.setattr(probe, "BUSY", float("inf"))
    assert main(["kernels", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["policy"] == "measured" and not rep["cached"]
    assert set(rep["choices"]) == set(autotune.DECISIONS)
    for name, chosen in rep["choices"].items():
        assert chosen in autotune.DECISIONS[name]
    assert rep["cache"].startswith(str(fresh))
    assert set(rep["table"]["decode.int8_weight"]) >= {"int8pack_mm"}
    assert all(us > 0 for shapes in rep["table"]["prefill.w8a8"].values()
               for us in shapes.values())
    autotune.reset()
    assert main(["kernels", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] and again["choices"] == rep["choices"]
    assert main(["kernels"]) == 0
    text = capsys.readouterr().out
    assert "decode.int8_weight" in text and "read from" in text
