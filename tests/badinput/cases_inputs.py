"""Bad inputs other than model files: recipes, calibration text, weights, architectures, and a
few through the CLI (``main([...])``: exit code 2, an ``error:`` line, no traceback)."""

from __future__ import annotations

import contextlib
import io
import json

import torch
from torch import nn

from .corpus import Env, case, register_all

# -- recipes --------------------------------------------------------------------------------

GRAMMAR = {
    "w9": "w9", "w0": "w0", "w4g0": "w4g0", "w4g-3": "w4g-3", "wfoo": "wfoo",
    "w4g128-foo": "w4g128-foo", "empty string": "", "blank": "   ",
    "w4-static without a8": "w4-static", "w4g99999999999999999999": "w4g99999999999999999999",
    "auto:garbage": "auto:garbage",
}


def _parse(text):
    def run(env: Env):
        from lowbit.model import Recipe

        Recipe.parse(text)
    return run


for _name, _text in GRAMMAR.items():
    case("recipe", _name, says=("recipe", "group", "algorithm", "static", "auto"))(
        _parse(_text))


def _weight(**kw) -> str:
    return json.dumps({"default": {"weight": kw}})


RECIPE_FILES = {  # name -> ((file name, text), words the message must hold)
    "bad JSON file": (("r.json", '{"name": "x", "default": '), "not valid JSON"),
    "bad YAML file": (("r.yaml", "name: [unclosed\n  default: {"), "not valid YAML"),
    "YAML python tag": (("r.yaml", "!!python/object/apply:os.system ['touch UNPICKLED']\n"),
                        "not valid YAML"),
    "YAML scalar": (("r.yml", "just a string\n"), "mapping"),
    "empty JSON file": (("r.json", ""), "not valid JSON"),
    "unknown top-level key": (("r.json", json.dumps({"name": "x", "defualt": {}})), "defualt"),
    "unknown scheme key": (("r.json", json.dumps({"default": {"bits": 4}})), "bits"),
    "unknown weight key": (("r.json", _weight(bitz=4)), "bitz"),
    "bits out of range (int9)": (("r.json", _weight(format="int9")), "int9"),
    "bits out of range (uint0)": (("r.json", _weight(format="uint0")), "uint0"),
    "group 0": (("r.json", _weight(granularity="group:0")), "group"),
    "group -3": (("r.json", _weight(granularity="group:-3")), "group"),
    "unknown observer": (("r.json", json.dumps({"default": {"observer": "median"}})), "median"),
    "unknown compute dtype": (("r.json", json.dumps({"compute_dtype": "fp64"})),
                              "compute_dtype"),
    "rules not a list": (("r.json", json.dumps({"rules": {"a": 1}})), "rules"),
    "newer recipe version": (("r.json", json.dumps({"lowbit_recipe_version": 7})),
                             "upgrade lowbit"),
}


def _recipe_file(arg):
    name, text = arg

    def run(env: Env):
        (env.tmp / name).write_text(text)
        _parse(str(env.tmp / name))(env)
        assert not env.marker.exists()
    return run


register_all(RECIPE_FILES, "recipe-file", _recipe_file)


@case("recipe-file", "missing recipe file", says="does not exist")
def _(env: Env):
    _parse(str(env.tmp / "missing.yaml"))(env)


# -- calibration text -----------------------------------------------------------------------


def _tok(env: Env):
    from lowbit import load_tokenizer

    return load_tokenizer(env.hf_dir)


@case("calibration", "text shorter than one window", says=("window",))
def _(env: Env):
    from lowbit.data import text

    (env.tmp / "short.txt").write_text("just a few words")
    text(env.tmp / "short.txt", _tok(env), tokens=512, seq_len=256, offset=0)


@case("calibration", "text not UTF-8", says=("UTF-8",))
def _(env: Env):
    from lowbit.data import text

    (env.tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 500)
    text(env.tmp / "latin1.txt", _tok(env), tokens=64, seq_len=32, offset=0)


@case("calibration", "missing text file", says=("no such file", "existing file"))
def _(env: Env):
    from lowbit.data import text

    text(env.tmp / "missing.txt", _tok(env), tokens=64, seq_len=32, offset=0)


@case("calibration", "empty text file", says=("window", "empty"))
def _(env: Env):
    from lowbit.data import text

    (env.tmp / "empty.txt").write_text("")
    text(env.tmp / "empty.txt", _tok(env), tokens=64, seq_len=32, offset=0)


@case("calibration", "calibrated recipe without data", says=("calibration",))
def _(env: Env):
    from lowbit import quantize

    from ..model.tiny import tiny_llama

    quantize(tiny_llama(), "w4g32-gptq", None, progress=False)


# -- weights and architectures --------------------------------------------------------------


def _poisoned(value: float):
    from ..model.tiny import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    return model


def _poison_case(arg):
    value, recipe = arg

    def run(env: Env):
        from lowbit import quantize

        calib = [torch.randint(0, 128, (1, 32))]
        quantize(_poisoned(value), recipe, calib if "-" in recipe else None, progress=False)
    return run


POISON = {
    "NaN weight, w8": ((float("nan"), "w8"), ("layers.1.mlp.down_proj",)),
    "Inf weight, w4g32": ((float("inf"), "w4g32"), ("layers.1.mlp.down_proj",)),
    "NaN weight, w4g32-gptq": ((float("nan"), "w4g32-gptq"), ("layers.1.mlp.down_proj",)),
    "-Inf weight, w4g32-hqq": ((float("-inf"), "w4g32-hqq"), ("layers.1.mlp.down_proj",)),
    "NaN weight, fp8": ((float("nan"), "fp8"), ("layers.1.mlp.down_proj",)),
}
register_all(POISON, "weights", _poison_case)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x):
        return self.conv(x)


@case("architecture", "model without nn.Linear", says=("no nn.Linear",))
def _(env: Env):
    from lowbit import quantize

    quantize(Convs(), "w8", progress=False)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x.float())))


@case("architecture", "unknown architecture, calibrated recipe", says=("blocks", "layout"))
def _(env: Env):
    from lowbit import quantize

    quantize(Mlp(), "w8-gptq", [torch.randn(2, 32)], progress=False)


@case("architecture", "unknown architecture, runtime", says=("Llama-style",))
def _(env: Env):
    from lowbit.runtime.generation import generate

    generate(Mlp(), torch.zeros(1, 4, dtype=torch.long), 2)


@case("architecture", "BERT config, runtime", says=("model_type",))
def _(env: Env):
    from transformers import BertConfig, BertModel

    from lowbit.runtime.generation import generate

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, vocab_size=50)
    generate(BertModel(cfg).eval(), torch.zeros(1, 4, dtype=torch.long), 2)


@case("architecture", "load_model of a non-path", says=("nn.Module",))
def _(env: Env):
    from lowbit import load_model

    load_model(42)


# -- through the CLI's main() (exit code 2, no traceback) ----------------------------------


def cli(*argv: str) -> tuple[int, str]:
    from lowbit.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


CLI = {
    "quantize, --recipe w9": (["quantize", "{hf}", "-r", "w9", "-o", "{tmp}/out"], "recipe"),
    "quantize, pickle model": (["quantize", "{tmp}/m.pt", "-o", "{tmp}/out"], "unpickles"),
    "quantize, existing output": (["quantize", "{hf}", "-o", "{tmp}"], "--overwrite"),
    "quantize, missing calibration file": (
        ["quantize", "{hf}", "-r", "w4g32-gptq", "--calibration", "{tmp}/none.txt",
         "-o", "{tmp}/out"], "none.txt"),
    "eval, --data missing": (["eval", "{hf}", "--data", "{tmp}/none.txt", "--no-speed"],
                             "none.txt"),
    "sensitivity, --data missing": (["sensitivity", "{hf}", "--recipe", "w8", "--data",
                                     "{tmp}/none.txt"], "none.txt"),
    "qat, --data missing": (["qat", "{hf}", "--data", "{tmp}/none.txt", "--steps", "1",
                             "-o", "{tmp}/out"], "none.txt"),
    "quantize, --threads -1": (["quantize", "{hf}", "--threads", "-1", "-o", "{tmp}/out"],
                               "--threads"),
    "quantize, --calibration-tokens 0": (
        ["quantize", "{hf}", "-r", "w4g32-gptq", "--calibration-tokens", "0", "-o", "{tmp}/out"],
        "--calibration-tokens 0 is less than one calibration window (512 tokens)"),
    "quantize, --calibration-tokens under one window": (
        ["quantize", "{hf}", "-r", "w4g32-gptq", "--calibration-tokens", "100", "-o",
         "{tmp}/out"], "--calibration-tokens 100 is less than one calibration window (512 "
                       "tokens); use 512 or more"),
    "quantize, --calibration is a folder": (
        ["quantize", "{hf}", "-r", "w4g32-gptq", "--calibration", "{tmp}", "-o", "{tmp}/out"],
        "existing file"),
    "quantize, calibration mix without a share": (
        ["quantize", "{hf}", "-r", "w4g32-gptq", "--calibration", "default+{tmp}/m.pt",
         "-o", "{tmp}/out"], "needs a share"),
    "quantize, calibration mix with a missing file": (
        ["quantize", "{hf}", "-r", "w4g32-gptq", "--calibration", "default+{tmp}/none.txt@0.25",
         "-o", "{tmp}/out"], "none.txt"),
    "eval, --window 0": (["eval", "{hf}", "--window", "0", "--no-speed"], "window"),
    "qat, --seq-len 1": (["qat", "{hf}", "--seq-len", "1", "--steps", "1", "-o", "{tmp}/out"],
                         "seq_len"),
    "qat, --overwrite onto a non-checkpoint folder": (
        ["qat", "{hf}", "--steps", "1", "-o", "{tmp}", "--overwrite"], "not a lowbit checkpoint"),
    "eval, recipe file with bad YAML": (["eval", "{hf}", "--recipe", "{tmp}/r.yaml", "--no-speed"],
                                        "recipe"),
}


def _cli_case(arg):
    def run(env: Env):
        from . import files

        files.write_torch_pickle(env.tmp / "m.pt", env.marker)
        (env.tmp / "r.yaml").write_text("name: [unclosed\n")
        argv = [a.format(hf=env.hf_dir, tmp=env.tmp) for a in arg]
        return cli(*argv)
    return run


for _name, (_argv, _says) in CLI.items():
    case("cli", _name, says=_says, cli=True, no_marker=True)(_cli_case(_argv))


# -- through the installed console script, in a subprocess ---------------------------------


def script(*argv: str) -> tuple[int, str]:
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("lowbit")
    done = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr


def _script_case(arg):
    def run(env: Env):
        from . import files

        files.write_torch_pickle(env.tmp / "m.pt", env.marker)
        hf = env.copy(env.hf_dir, "hf")
        (hf / "model.safetensors").write_bytes(b"\x10\x00")
        return script(*[a.format(hf=env.hf_dir, bad=hf, tmp=env.tmp) for a in arg])
    return run


SCRIPT = {
    "quantize, torch.save .pt": (["quantize", "{tmp}/m.pt", "-o", "{tmp}/out"], "unpickles"),
    "quantize, truncated safetensors": (["quantize", "{bad}", "-o", "{tmp}/out"], "truncated"),
    "quantize, --recipe w4g0": (["quantize", "{hf}", "-r", "w4g0", "-o", "{tmp}/out"],
                                "group size 0"),
}
for _name, (_argv, _says) in SCRIPT.items():
    case("console-script", _name, says=_says, cli=True, no_marker=True)(_script_case(_argv))
