"""``lowbit formats``: every number format with its bits, range, levels and subnormals, and
the llama.cpp (GGUF) types and mixes that ``gguf:<type>`` recipes solve on."""

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


def gguf_rows() -> list[dict]:
    """One row per llama.cpp type and mix a ``gguf:`` recipe names."""
    from lowbit.model.gguf_grids import GGUF_FALLBACK, GGUF_GRIDS, bits_per_weight
    from lowbit.model.gguf_mixes import MIX_DEFAULT, MIX_NOTES, output_type

    rows = []
    for kind, (fmt, _, group, scale) in GGUF_GRIDS.items():
        rows.append({"recipe": f"gguf:{kind}", "type": kind.upper(), "format": fmt,
                     "group": group, "scale": scale, "bits_per_weight": bits_per_weight(kind),
                     "rows_not_256": GGUF_FALLBACK.get(kind, kind).upper(),
                     "head": output_type(kind).upper(), "note": MIX_NOTES.get(kind, "")})
    for kind, main in MIX_DEFAULT.items():
        if kind not in GGUF_GRIDS:
            rows.append({"recipe": f"gguf:{kind}", "type": f"mix of {main.upper()}",
                         "head": output_type(kind).upper(), "note": MIX_NOTES[kind]})
    return rows


GGUF_COLUMNS = ("recipe", "type", "format", "group", "scale", "bits_per_weight",
                "rows_not_256", "head", "note")


def _print_table(columns, rows) -> None:
    table = [columns] + [tuple(_fmt_num(r.get(c, "")) for c in columns) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run(args: argparse.Namespace) -> int:
    rows = [f.describe() for f in list_formats()]
    if args.json:
        print(json.dumps(rows + [{"kind": "gguf", **r} for r in gguf_rows()], indent=2))
        return 0
    _print_table(COLUMNS, rows)
    print("\nllama.cpp (GGUF) types and mixes: recipe gguf:<type>[-<algorithm>] solves on "
          "their grids, lowbit export --to gguf writes them unchanged; gguf:auto:<type>"
          "[-<algorithm>] picks each tensor's type by measured sensitivity within the bytes "
          "<type> spends")
    _print_table(GGUF_COLUMNS, gguf_rows())
    return 0
