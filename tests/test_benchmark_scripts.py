"""Every benchmark script starts from the repository root (``python benchmarks/X.py --help``).

A script named like an installed package (``benchmarks/kernels.py`` once shadowed the
``kernels`` package that transformers imports) breaks only when run from there, so each
runs in a subprocess exactly as the README says.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5


def test_every_benchmark_starts_from_the_repo_root():
    procs = {p.name: subprocess.Popen([sys.executable, str(p.relative_to(ROOT)), "--help"],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for p in SCRIPTS}
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage" not in out.lower():
            failed[name] = (proc.returncode, err.strip()[-500:])
    assert not failed, failed


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_benchmark_shadows_an_installed_package(script):
    import importlib.util

    stem = script.stem
    spec = importlib.util.find_spec(stem)
    assert spec is None or Path(spec.origin or "").parent == script.parent, (
        f"benchmarks/{script.name} has the name of the installed module {stem!r} "
        f"({spec.origin}); scripts run from the repo root would import it instead")


def test_readme_and_results_md_match_the_measurements():
    """README's results table and docs/results.md are generated from docs/*.json."""
    proc = subprocess.run([sys.executable, "benchmarks/docs_results.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_is_a_page_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "../shared" not in text


def test_nothing_shipped_points_at_the_team_guides():
    """The project stands alone: no source, benchmark, script or doc cites the team's guides
    (DESIGN/STYLE/BENCHMARKS/EXPORT.md outside the repository)."""
    guides = ("shared/DESIGN", "shared/STYLE", "shared/BENCHMARKS", "shared/EXPORT", "../shared")
    found = [f"{path.relative_to(ROOT)}: {g}"
             for folder in ("src", "benchmarks", "scripts", "docs")
             for path in (ROOT / folder).rglob("*") if path.is_file()
             and path.suffix in (".py", ".md", ".sh", ".json", ".c", ".h", ".txt")
             for g in guides if g in path.read_text(errors="replace")]
    assert not found, found


def test_gguf_export_append_keeps_the_reports_notes():
    """``--append`` merges rows into an existing report; what earlier runs noted stays."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gguf_export
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    old = {"model": "m", "chunks": 16, "calib_tokens": 8, "commands": ["a"], "note": "N.",
           "speed_note": "S", "rows": [{"row": "x", "v": 1}, {"row": "y", "v": 1}]}
    new = {"model": "m", "chunks": 16, "calib_tokens": 8, "commands": ["b"],
           "rows": [{"row": "y", "v": 2}]}
    merged = gguf_export._merged(old, new)
    assert merged["note"] == "N." and merged["speed_note"] == "S"
    assert merged["commands"] == ["a", "b"]
    assert [(r["row"], r["v"]) for r in merged["rows"]] == [("x", 1), ("y", 2)]
    with pytest.raises(SystemExit, match="chunks"):
        gguf_export._merged(old, {**new, "chunks": 8})
