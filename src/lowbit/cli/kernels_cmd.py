"""``lowbit kernels``: which kernels run on this machine, and the timings that chose them."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--remeasure", action="store_true",
                   help="time the candidates again (else the cached choice is shown)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads to measure with (default: torch's; choices are kept "
                        "per thread count)")


def report(remeasure: bool = False) -> dict:
    """The CPU, every decision's choice and ranking, and the measured table."""
    import lowbit.runtime  # noqa: F401  (registers the step probe runtime.* depends on)
    from lowbit.kernels import autotune, cpu_features, native

    flags = autotune.by_flags()
    entry = None if flags else autotune.measured(remeasure=remeasure)
    out = {
        "cpu": cpu_features().describe(),
        "native": "available" if native.available() else f"unavailable: "
                                                          f"{native.why_unavailable()}",
        "policy": "cpu flags (assume_cpu / LOWBIT_CPU)" if flags else "measured",
        "choices": {name: autotune.choice(name) for name in autotune.DECISIONS},
    }
    if entry is not None:
        out.update(key=entry["key"], cache=str(autotune.cache_path()), cached=entry["cached"],
                   seconds=entry["seconds"], noise=entry["noise"], load=entry["load"],
                   noisy=entry["noisy"],
                   table=entry["table"])
    return out


def _lines(rep: dict) -> list[str]:
    lines = [f"cpu      {rep['cpu']}", f"native   {rep['native']}", f"policy   {rep['policy']}"]
    if "key" in rep:
        how = "read from" if rep["cached"] else f"measured in {rep['seconds']:.2f} s, saved to"
        lines.append(f"cache    {how} {rep['cache']} ({rep['key']['cpu']}, torch "
                     f"{rep['key']['torch']}, {rep['key']['threads']} threads)")
        if rep["noisy"]:
            lines.append(f"note     timings were noisy (winner's median {rep['noise']}x its "
                         f"best run, load {rep['load']} per core: a busy machine); the next "
                         "process measures again")
    lines.append("")
    table = rep.get("table", {})
    for name in sorted(set(table) | set(rep["choices"])):
        chosen = rep["choices"].get(name)
        lines.append(f"{name}" + (f"  -> {chosen}" if chosen else "  (input to runtime.*)"))
        for cand, shapes in table.get(name, {}).items():
            times = ", ".join(f"{shape} {us:,.1f} us" for shape, us in shapes.items())
            lines.append(f"  {'*' if cand == chosen else ' '} {cand:<12} {times}")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rep = report(remeasure=args.remeasure)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print("\n".join(_lines(rep)))
    return 0
