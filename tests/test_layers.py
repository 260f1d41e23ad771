"""The layer rule: lower layers never import upper ones; `import lowbit` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
BASE = {"errors", "version"}
LOW = BASE | {"formats"}
ALLOWED = {
    "formats": BASE,
    "observers": LOW,
    "kernels": LOW,
    "nn": LOW | {"kernels", "observers"},
    # (layer 3 holds the kernels: GPTQ's column loops run in lowbit's C library)
    "algorithms": LOW | {"observers", "kernels"},
    "runtime": LOW | {"kernels", "nn"},
    # data and model are one layer: data resolves tokenizer names through model's loaders,
    # model resolves lazy calibration text through data
    "model": LOW | {"observers", "kernels", "nn", "algorithms", "runtime", "model", "data"},
}
# data resolves tokenizer names through the model layer's loaders
ALLOWED["data"] = BASE | {"model"}
ALLOWED["eval"] = ALLOWED["model"] | {"model", "data", "eval"}
ALLOWED["training"] = ALLOWED["model"] | {"model", "data", "training"}
ALLOWED["export"] = ALLOWED["model"] | {"export"}
ALLOWED["cli"] = None  # the top: may import anything


def _lowbit_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lowbit" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_never_import_upper_ones(layer):
    folder = SRC / layer
    if not folder.exists():
        pytest.skip(f"lowbit.{layer} does not exist yet")
    allowed = ALLOWED[layer]
    if allowed is None:
        return
    allowed = allowed | {layer}
    bad = {
        f"{p.relative_to(SRC)} imports lowbit.{m}"
        for p in folder.rglob("*.py")
        for m in _lowbit_imports(p)
        if m not in allowed
    }
    assert not bad, sorted(bad)


def test_import_is_light():
    code = (
        "import sys, lowbit, lowbit.formats, lowbit.observers\n"
        "heavy = [m for m in ('transformers', 'onnx', 'matplotlib', 'gguf') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
