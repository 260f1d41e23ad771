"""``lowbit formats``: every number format with its bits, range, levels and subnormals."""

from __future__ import annotations

import argparse
import json

from lowbit.formats import list_formats

COLUMNS = ("name", "kind", "bits", "min", "max", "levels", "smallest_normal", "smallest_subnormal")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _fmt_num(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def run(args: argparse.Namespace) -> int:
    rows = [f.describe() for f in list_formats()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [COLUMNS] + [tuple(_fmt_num(r.get(c, "")) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0
