"""``lowbit`` console entry point: one sub-command per module, registered here."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "formats": ("lowbit.cli.formats_cmd", "table of every number format"),
    "explain": ("lowbit.cli.explain", "show what a format does to some numbers, bit by bit"),
    "demo": ("lowbit.cli.demo_cmd", "the main job: quantize the bundled model, show the costs"),
    "qat": ("lowbit.cli.qat_cmd", "quantization-aware training with distillation, saved packed"),
    "quantize": ("lowbit.cli.quantize_cmd", "quantize a model with a recipe and save it"),
    "eval": ("lowbit.cli.eval_cmd", "perplexity, size and speed of a model or checkpoint"),
    "sensitivity": ("lowbit.cli.sensitivity_cmd", "which layers quantization hurts most (KLD)"),
    "bench": ("lowbit.cli.bench_cmd", "benchmark recipes and peers side by side, with a report"),
    "generate": ("lowbit.cli.generate_cmd", "stream text from a model or checkpoint, with speed"),
    "kernels": ("lowbit.cli.kernels_cmd", "which kernels run here, measured once and cached"),
    "export": ("lowbit.cli.export_cmd", "write a model for llama.cpp, transformers or vLLM"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize PyTorch models and LLMs and see what each choice costs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from lowbit.version import __version__

    return f"lowbit {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from lowbit.errors import LowbitError
    from lowbit.model.calib_memory import allocator_tuning

    try:
        with allocator_tuning():  # the CLI's process is lowbit's own
            return int(args._run(args) or 0)
    except LowbitError as exc:
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
