"""Sweeps on a real local Ray cluster (2 workers) give the serial run's numbers: bench rows,
sensitivity units and auto:<bpw> candidate scores; rows record the node that ran them and
--resume skips the finished ones."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from lowbit.eval.bench import BenchSettings, run_bench

from .conftest import TINY, needs_ray, same_numbers

pytestmark = needs_ray


def _settings(model_dir: Path, recipes) -> BenchSettings:
    return BenchSettings(model=str(model_dir), recipes=tuple(recipes), **TINY)


def test_bench_on_ray_equals_serial_and_resumes(ray_cluster, tiny_llama_dir, tmp_path):
    recipes = ("w8", "w4g32", "w4g64-gptq")
    serial = run_bench(_settings(tiny_llama_dir, recipes), tmp_path / "serial",
                       progress=False, write_report=False)
    on_ray = run_bench(_settings(tiny_llama_dir, recipes), tmp_path / "ray", progress=False,
                       write_report=False, ray=True)
    assert [r["id"] for r in on_ray["rows"]] == ["fp32", *recipes]
    assert all(r["status"] == "ok" for r in on_ray["rows"])
    assert ([same_numbers(r) for r in on_ray["rows"]]
            == [same_numbers(r) for r in serial["rows"]])
    here = ray_cluster.get_runtime_context().get_node_id()
    for row in on_ray["rows"]:
        assert row["node"]["node_id"] == here and row["node"]["pid"] != os.getpid()
        assert row["node"]["hostname"]
    assert all(r["node"]["node_id"] is None for r in serial["rows"])
    on_disk = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(on_ray["rows"]))

    more = run_bench(_settings(tiny_llama_dir, (*recipes, "w3g32")), tmp_path / "ray",
                     progress=False, write_report=False, ray=True, resume=True)
    assert [r["id"] for r in more["rows"]] == ["fp32", *recipes, "w3g32"]
    assert more["rows"][:4] == on_disk["rows"]  # finished rows kept as they were, not rerun
    assert more["rows"][4]["status"] == "ok" and more["rows"][4]["node"]["node_id"] == here


def test_sensitivity_on_ray_equals_serial(ray_cluster, tiny_llama_dir):
    from lowbit.eval.sensitivity import sensitivity
    from lowbit.model import load_model, load_tokenizer

    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    kwargs = {"window": 32, "n_windows": 2, "progress": False}
    for per in ("layer", "block"):
        serial = sensitivity(model, tok, "w4g32", per=per, **kwargs)
        on_ray = sensitivity(model, tok, "w4g32", per=per, ray=True, **kwargs)
        assert on_ray.baseline_ppl == serial.baseline_ppl
        assert len(on_ray.rows) == len(serial.rows) == (15 if per == "layer" else 3)
        assert ([dataclasses.replace(r, seconds=0) for r in on_ray.rows]
                == [dataclasses.replace(r, seconds=0) for r in serial.rows])
        assert on_ray.notes == serial.notes


def _calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 300, (1, 64), generator=g) for _ in range(4)]


@pytest.mark.parametrize("recipe", ["auto:4", "auto:4-gptq"])
def test_auto_scoring_on_ray_equals_serial(ray_cluster, tiny_llama_dir, monkeypatch, recipe):
    import lowbit as lb

    done = {}
    for where in ("serial", "ray"):
        if where == "ray":
            monkeypatch.setenv("LOWBIT_RAY", "local")  # how `lowbit quantize` reaches it
        model = lb.load_model(tiny_llama_dir)
        lb.quantize(model, lb.Recipe.parse(recipe).with_keep("lm_head"), _calibration(),
                    progress=False)
        done[where] = model.lowbit_sensitivity, model.lowbit_recipe
    assert done["ray"][0] == done["serial"][0]
    assert done["ray"][1] == done["serial"][1]
    assert len(done["ray"][0]) == 14


def test_every_layer_x_candidate_scored_on_ray(ray_cluster, tiny_llama_dir):
    from lowbit.model import load_model
    from lowbit.model.mixed import candidate_schemes, sensitivity

    model = load_model(tiny_llama_dir)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    cands = candidate_schemes(("w3g64", "w8"))
    kwargs = {"anchor": "w3g64", "measure": "all", "progress": False}
    serial = sensitivity(model, _calibration()[:1], cands, names, **kwargs)
    on_ray = sensitivity(model, _calibration()[:1], cands, names, ray=True, **kwargs)
    assert on_ray == serial
    assert list(on_ray[names[0]]["kl"]) == ["w3g64", "w8"]


def test_gptq_candidates_solved_on_ray(ray_cluster, tiny_llama_dir):
    """auto:<bpw>-gptq's heavy part: every group x candidate solved as a task, the errors and
    the kept weights equal to the serial solve."""
    from lowbit.model import load_model
    from lowbit.model.mixed import candidate_schemes, solved_errors

    model = load_model(tiny_llama_dir)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    cands = candidate_schemes(("w2g64", "w3g64", "w8"), "gptq")
    serial = solved_errors(model, _calibration(), cands, names, keep={"w3g64"},
                           progress=False)
    on_ray = solved_errors(model, _calibration(), cands, names, keep={"w3g64"},
                           progress=False, ray=True)
    assert list(on_ray) == list(serial) == names
    for n in names:
        assert on_ray[n]["err"] == serial[n]["err"]
        assert list(on_ray[n]["w_hat"]) == ["w3g64"]
        assert torch.equal(on_ray[n]["w_hat"]["w3g64"], serial[n]["w_hat"]["w3g64"])
