"""Reports: the benchmark results as Markdown and HTML tables with matplotlib plots.

Everything here reads the plain ``results.json`` dictionary (``bench.run_bench``), so a report
can be rebuilt from a results file alone. matplotlib is imported inside the plotting functions
and draws with the Agg backend through ``matplotlib.figure.Figure`` (no pyplot, no display, no
global backend switch). Every file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PLOTS", "markdown_table", "pareto_front", "plot_sensitivity_heatmap",
           "speed_ratio", "write_report"]

PLOTS = {
    "pareto_ppl.png": "Pareto front: bits per weight vs ΔPPL",
    "pareto_kld.png": "Pareto front: bits per weight vs mean KL divergence",
    "speed_size.png": "decode speed vs size",
    "layer_error.png": "per-layer weight error (SQNR)",
}
_COLUMNS = ("config", "bits/weight", "linear MB", "PPL", "ΔPPL", "mean KLD", "p99 KLD",
            "same top-1", "prefill ms", "decode tok/s", "decode ×FP32*", "kernel / engine")


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and "ppl" in r]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better),
    ordered by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def _fmt_kld(value) -> str:
    """KLD with 4 decimals; tiny values (a bf16-rounded baseline can make them slightly
    negative) in scientific notation."""
    if value is not None and abs(value) < 1e-4:
        return f"{value:.1e}"
    return _fmt(value, ".4f")


def _kernel(row: dict) -> str:
    kernels = row.get("kernels") or {}
    main = max(kernels, key=kernels.get) if kernels else "—"
    engine = row.get("engine")
    return f"{main}; {engine}" if engine and engine not in main else main


def _family(engine: str | None) -> str:
    """``"lowbit.runtime (bfloat16)"`` -> ``"lowbit.runtime"``."""
    return (engine or "").split(" (")[0]


def speed_ratio(row: dict, base: dict | None) -> float | None:
    """Decode speed of ``row`` over the FP32 baseline's with the same engine (lowbit's runtime,
    transformers.generate); engines without an FP32 timing (llama.cpp) compare with FP32
    under transformers.generate, as BENCHMARKS.md does."""
    decode = row.get("decode_tok_s")
    if not decode or base is None:
        return None
    by_engine = base.get("decode_by_engine") or {base.get("engine"): base.get("decode_tok_s")}
    by_engine = {_family(k): v for k, v in by_engine.items() if k}
    ref = by_engine.get(_family(row.get("engine"))) or by_engine.get("transformers.generate")
    return decode / ref if ref else None


def _cells(row: dict, base: dict | None) -> list[str]:
    baseline = row["kind"] == "baseline"
    decode = row.get("decode_tok_s")
    ratio = speed_ratio(row, base)
    return [
        row["id"], _fmt(row.get("bits_per_weight"), ".2f"),
        _fmt(row.get("linear_bytes", 0) / 1e6 if "linear_bytes" in row else None, ".1f"),
        _fmt(row.get("ppl"), ".3f"),
        "—" if baseline else _fmt(row.get("delta_ppl_pct"), "+.2f", "%"),
        "—" if baseline else _fmt_kld(row.get("kld_mean")),
        "—" if baseline else _fmt(row.get("kld_p99"), ".3f"),
        "—" if baseline else _fmt(100 * row["top1_agreement"] if "top1_agreement" in row
                                   else None, ".1f", "%"),
        _fmt(1e3 * row["prefill_s"] if "prefill_s" in row else None, ".0f"),
        _fmt(decode, ".1f"), _fmt(ratio, ".2f"), _kernel(row),
    ]


def _base(rows: Sequence[dict]) -> dict | None:
    return next((r for r in rows if r["kind"] == "baseline"), None)


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (finished rows only), baseline first."""
    rows = _ok(results["rows"])
    base = _base(rows)
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r, base)) + " |")
    return "\n".join(lines)


def _other_rows(results: dict) -> list[str]:
    lines = []
    for name, st in sorted(results.get("peers", {}).items()):
        state = f"installed ({st['version']})" if st["installed"] else \
            f"**not installed** (install with `{st['install']}`); its rows were not run"
        lines.append(f"- {name}: {state}")
    for r in results["rows"]:
        if r.get("status") == "failed":
            lines.append(f"- `{r['id']}` **failed**: {r.get('error', '')}")
    return lines


def _header(results: dict) -> list[str]:
    s, env = results["settings"], results.get("environment", {})
    base = next((r for r in _ok(results["rows"]) if r["kind"] == "baseline"), None)
    return [
        f"Model `{s['model']}`; data `{s['data']}`: {s['n_windows']} windows of {s['window']} "
        f"tokens, protocol `{s['protocol']}`"
        + (f", baseline PPL {base['ppl']:.3f}" if base else "") + ".",
        f"torch {env.get('torch', '?')}, lowbit {env.get('lowbit', '?')}, "
        f"torch threads: {env.get('threads', '?')}, on {env.get('platform', '?')}, "
        f"{env.get('date', '')}."
        " Speed on a shared machine is noisy: compare ratios to FP32 from the same run."
        " *Decode ×FP32 divides by FP32 decoding with the same engine (transformers.generate"
        " for torch peers and llama.cpp, lowbit's runtime where it ran).",
        "ΔPPL, KLD and top-1 are measured against the FP32 model's own next-token "
        "distributions on the same tokens; bits/weight counts codes, scales and zero-points of "
        "every linear layer (the output head included).",
    ]


def write_report(results: dict, out_dir: str | os.PathLike, *, plots: bool = True
                 ) -> dict[str, Path]:
    """Write the plots, report.md and report.html into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = _plots(results, out) if plots else {}
    written = {name: p for name, p in drawn.items() if p is not None}
    md = _markdown(results, written)
    _write_text(out / "report.md", md)
    _write_text(out / "report.html", _html(results, written))
    return {"report.md": out / "report.md", "report.html": out / "report.html", **written}


def _write_text(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def _markdown(results: dict, plots: dict) -> str:
    lines = [f"# lowbit bench: {results['settings']['model']}", "", *_header(results), "",
             "Regenerate everything with:", "", f"    {results.get('command', '')}", "",
             "## Results", "", markdown_table(results), ""]
    other = _other_rows(results)
    if other:
        lines += ["## Peers and failures", "", *other, ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{PLOTS[name]}]({name})" for name in plots] + [""]
    lines += ["## Reproduce each row", "", "| config | what runs | command |", "|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['id']} | {r.get('label', '')} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def _html(results: dict, plots: dict) -> str:
    esc = html.escape
    rows = _ok(results["rows"])
    base = _base(rows)
    head = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    body = "".join(
        f"<tr title=\"{esc(r['command'])}\">" + "".join(f"<td>{esc(c)}</td>"
                                                        for c in _cells(r, base)) + "</tr>"
        for r in rows)
    other = "".join(f"<li>{esc(line[2:])}</li>" for line in _other_rows(results))
    imgs = "".join(f"<figure><img src=\"{n}\" alt=\"{esc(PLOTS[n])}\"><figcaption>"
                   f"{esc(PLOTS[n])}</figcaption></figure>" for n in plots)
    cmds = "".join(f"<tr><td>{esc(r['id'])}</td><td><code>{esc(r['command'])}</code></td></tr>"
                   for r in results["rows"])
    intro = "".join(f"<p>{esc(p)}</p>" for p in _header(results))
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>lowbit bench</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,td:last-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>lowbit bench: {esc(results['settings']['model'])}</h1>{intro}"
        f"<p>Regenerate everything with: <code>{esc(results.get('command', ''))}</code></p>"
        f"<h2>Results</h2><table><tr>{head}</tr>{body}</table>"
        + (f"<h2>Peers and failures</h2><ul>{other}</ul>" if other else "")
        + f"<h2>Plots</h2>{imgs}<h2>Reproduce each row</h2><table>{cmds}</table>"
        "</body></html>\n")


# -- plots ----------------------------------------------------------------------------------
def _figure(figsize: tuple[float, float]):
    """A figure drawn by the Agg backend, without pyplot (no global backend switch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    part = path.with_name(path.name + ".part")
    fig.savefig(part, format="png", dpi=110, bbox_inches="tight")
    os.replace(part, path)
    return path


_STYLE = {"baseline": ("k", "s"), "lowbit": ("tab:blue", "o"), "torchao": ("tab:orange", "^"),
          "quanto": ("tab:green", "v"), "llama.cpp": ("tab:red", "D")}


def _style(row: dict) -> tuple[str, str, str]:
    key = row.get("peer") or row["kind"]
    color, marker = _STYLE.get(key, ("tab:purple", "P"))
    return color, marker, {"baseline": "FP32", "lowbit": "lowbit"}.get(key, key)


def _scatter(rows, x_key, y_key, path, xlabel, ylabel, yscale, front=True):
    pts = [(r, r.get(x_key), r.get(y_key)) for r in rows]
    pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None
           and (yscale != "log" or y > 0)]
    if not pts:
        return None
    fig, ax = _figure(figsize=(7.5, 4.8))
    labelled = set()
    for r, x, y in pts:
        color, marker, label = _style(r)
        ax.scatter(x, y, c=color, marker=marker, s=40, zorder=3,
                   label=None if label in labelled else label)
        labelled.add(label)
        ax.annotate(r["id"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        idx = pareto_front([(x, y) for _, x, y in pts])
        ax.plot([pts[i][1] for i in idx], [pts[i][2] for i in idx], "--", c="grey", lw=1,
                zorder=2, label="Pareto front")
    ax.set_yscale(yscale, **({"linthresh": 0.1} if yscale == "symlog" else {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    saved = _save(fig, path)
    return saved


def _layer_plot(rows, path: Path):
    rows = [r for r in rows if r.get("layer_sqnr_db")]
    if not rows:
        return None
    fig, ax = _figure(figsize=(9, 4.5))
    for r in rows:
        values = list(r["layer_sqnr_db"].values())
        ax.plot(range(len(values)), [math.nan if v is None else v for v in values], lw=1,
                label=r["id"], marker=".", ms=3, alpha=0.8,
                ls="-" if r["kind"] == "lowbit" else "--")
    names = list(rows[0]["layer_sqnr_db"])
    step = max(1, len(names) // 12)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([names[i] for i in range(0, len(names), step)], rotation=60,
                       ha="right", fontsize=6)
    ax.set_ylabel("weight SQNR (dB, higher is better)")
    ax.set_title("per-layer weight error, in model order")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    saved = _save(fig, path)
    return saved


def _plots(results: dict, out: Path) -> dict[str, Path | None]:
    rows = [dict(r, linear_mb=r["linear_bytes"] / 1e6 if "linear_bytes" in r else None)
            for r in _ok(results["rows"])]  # copies: the results stay as they were
    cand = [r for r in rows if r["kind"] != "baseline"]
    protocol = results["settings"]["protocol"]
    return {
        "pareto_ppl.png": _scatter(rows, "bits_per_weight", "delta_ppl_pct",
                                   out / "pareto_ppl.png", "bits per linear weight",
                                   f"ΔPPL vs FP32 (%, {protocol} protocol)", "symlog"),
        "pareto_kld.png": _scatter(cand, "bits_per_weight", "kld_mean",
                                   out / "pareto_kld.png", "bits per linear weight",
                                   "mean KL divergence vs FP32 (nats/token)", "log"),
        "speed_size.png": _scatter(rows, "linear_mb", "decode_tok_s",
                                   out / "speed_size.png", "linear weights (MB)",
                                   "decode tokens/s (higher is better)", "linear", front=False),
        "layer_error.png": _layer_plot(cand, out / "layer_error.png"),
    }


def plot_sensitivity_heatmap(result, path: str | os.PathLike) -> Path:
    """Heat map of a sensitivity result: blocks (rows) × module types (columns), mean KLD."""
    import numpy as np
    from matplotlib.colors import LogNorm

    rows = result.rows if hasattr(result, "rows") else result["rows"]
    get = (lambda r, k: getattr(r, k)) if hasattr(result, "rows") else (lambda r, k: r[k])
    blocks = sorted({(get(r, "index") is None, get(r, "index") or 0, get(r, "block"))
                     for r in rows})
    kinds = sorted({get(r, "kind") for r in rows})
    grid = np.full((len(blocks), len(kinds)), np.nan)
    row_of = {b[2]: i for i, b in enumerate(blocks)}
    for r in rows:
        grid[row_of[get(r, "block")], kinds.index(get(r, "kind"))] = max(get(r, "kld_mean"),
                                                                         1e-12)
    fig, ax = _figure(figsize=(1.2 + 1.1 * len(kinds), 1.5 + 0.22 * len(blocks)))
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(blocks)))
    ax.set_yticklabels([b[2] for b in blocks], fontsize=6)
    recipe = getattr(result, "recipe", None) or result.get("recipe", "")
    ax.set_title(f"KL divergence when one unit is quantized ({recipe})", fontsize=9)
    fig.colorbar(im, ax=ax, label="mean KLD (nats/token)")
    saved = _save(fig, Path(path))
    return saved
