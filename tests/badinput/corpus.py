"""The bad-input corpus: every case builds its input under a fresh tmp folder and hands it to
lowbit; each must end in a ``LowbitError`` whose message names the problem.

``CASES`` is filled by the ``@case`` decorator in ``cases_files`` and ``cases_inputs``. A case
function returns nothing; the harness (``test_badinput.py``) expects it to raise.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Env:
    """What a case may use: its own empty ``tmp`` folder and read-only base assets."""

    tmp: Path
    hf_dir: Path  # tiny Llama: config.json + model.safetensors + tokenizer
    ckpt_dir: Path  # the same model quantized (w8) and written by lowbit.save

    @property
    def marker(self) -> Path:
        """Appears only if a booby-trapped pickle is unpickled."""
        return self.tmp / "UNPICKLED"

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst


@dataclass
class Case:
    category: str
    name: str
    run: Callable[[Env], object]
    says: tuple[str, ...]  # the message contains one of these (case-insensitive)
    cli: bool = False  # run returns (exit code, stderr) instead of raising
    xfail: str | None = None
    no_marker: bool = False  # assert the unpickle marker never appears

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


CASES: list[Case] = []


def case(category: str, name: str, *, says: tuple[str, ...] | str, cli: bool = False,
         xfail: str | None = None, no_marker: bool = False):
    says = (says,) if isinstance(says, str) else says

    def register(fn):
        CASES.append(Case(category, name, fn, says, cli, xfail, no_marker))
        return fn

    return register


def register_all(entries: dict, category: str, make: Callable, **kw) -> None:
    """One case per ``name -> (argument, says)`` entry; ``make(argument)`` returns the run."""
    for name, (arg, says) in entries.items():
        case(category, name, says=says, **kw)(make(arg))


@dataclass
class Tally:
    """Cases tried / handled / not handled, per category."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, c: Case, outcome: str) -> None:
        self.rows.append((c.category, c.name, outcome))

    def lines(self) -> list[str]:
        cats: dict[str, dict[str, int]] = {}
        for cat, _, outcome in self.rows:
            counts = cats.setdefault(cat, {"tried": 0, "handled": 0, "not handled": 0})
            counts["tried"] += 1
            counts["handled" if outcome == "handled" else "not handled"] += 1
        total = {k: sum(c[k] for c in cats.values()) for k in ("tried", "handled", "not handled")}
        out = [f"bad-input corpus: {total['tried']} tried, {total['handled']} handled, "
               f"{total['not handled']} not handled"]
        out += [f"  {cat:<22} {c['tried']:>3} tried {c['handled']:>3} handled "
                f"{c['not handled']:>3} not handled" for cat, c in sorted(cats.items())]
        out += [f"  NOT HANDLED {cat}/{name}: {o}" for cat, name, o in self.rows if o != "handled"]
        return out


TALLY = Tally()


def all_cases() -> list[Case]:
    from . import cases_files, cases_inputs, cases_output  # noqa: F401  (registers the cases)

    return CASES
