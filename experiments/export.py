"""Export a trained model in every portable format and time one batch in each.

    python -m experiments.export out/pretrain_gpt --out out/export
    python -m experiments.export path/to/hf-folder --out out/export --batch 8 --length 64

The model is a ``pretrain_gpt`` run folder or checkpoint file, or a local Hugging Face folder
(GPT-2, Llama, BERT or Marian), exported on ``--device`` in ``--dtype`` (onnxruntime runs on
the CPU). Writes, into ``--out``:

* ``program.pt2``: the ``torch.export`` program of the model's logits, dynamic batch and length
  (``torch.export.load`` reads it back);
* ``package.pt2``: that program compiled by AOTInductor, and ``run_package.py``, a script that
  runs it with torch alone (no functional_llm);
* ``model.onnx``: the same program for onnxruntime (needs the ``[export]`` extra).

Then prints each file's size and a latency table for one ``(--batch, --length)`` batch: eager,
``torch.compile``, the exported program, the AOTInductor package and onnxruntime, with each
one's largest difference from eager and its speed relative to eager (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import functional_llm as fl
from experiments import cli
from experiments.generate import load
from functional_llm import export as ex
from functional_llm.interop import hf

RUNNER = '''"""Run the AOTInductor package beside this script with torch alone."""
import sys
from pathlib import Path

import torch

package = torch._inductor.aoti_load_package(str(Path(__file__).with_name("package.pt2")))
tokens = torch.randint(0, {vocab}, (2, 16), device="{device}")
print(package(tokens, torch.ones_like(tokens, dtype=torch.bool)).shape)
'''


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("model", help="a pretrain_gpt run folder or checkpoint, or a Hugging Face model folder")
    a("--out", default="out/export", help="folder for the exported files")
    a("--batch", type=cli.positive_int, default=4)
    a("--length", type=cli.positive_int, default=32)
    a("--repeats", type=cli.positive_int, default=20)
    a("--skip", action="append", default=[], choices=("compile", "aoti", "onnx"),
      help="leave out a slow format (repeatable)")  # fmt: skip
    a("--overwrite", action="store_true", help="replace the files of an earlier export")
    cli.add_device_args(p)
    return p.parse_args(argv)


def _model(where: Path) -> tuple[Any, Any]:
    if (where / "config.json").exists():
        model, params = hf.load(where)
        return fl.nn.inference(model), params
    model, params, _ = load(where)
    return model, params


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up (and the compile, for torch.compile)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _flat(x: Any) -> torch.Tensor:
    return torch.cat([torch.as_tensor(t).float().cpu().flatten() for t in fl.tree.leaves(x)])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    model, params = _model(Path(args.model))
    model = type(model)(dataclasses.replace(model.config, dtype=cli.dtype(args)))
    params = cli.to_device(params, cli.device(args), cli.dtype(args))
    out = Path(args.out)
    names = ("program.pt2", "package.pt2", "model.onnx", "run_package.py")
    if not args.overwrite and any((out / n).exists() for n in names):
        raise FileExistsError(f"{out} holds an earlier export; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    limit = getattr(model, "backbone", model).config.max_seq_len
    fn, _, inputs = ex.signature(model, args.batch, min(args.length, limit), cli.device(args))
    program = ex.export_model(model, params)
    torch.export.save(program, out / "program.pt2")
    exported = program.module()
    runners: dict[str, Callable[[], Any]] = {
        "eager": lambda: fn(params, *inputs),
        "exported": lambda: exported(*inputs),
    }
    if "compile" not in args.skip:
        compiled = torch.compile(fn)
        runners["compiled"] = lambda: compiled(params, *inputs)
    if "aoti" not in args.skip:
        ex.aot_package(program, out / "package.pt2")
        package = torch._inductor.aoti_load_package(str(out / "package.pt2"))
        runners["aotinductor"] = lambda: package(*inputs)
        vocab = getattr(model, "backbone", model).config
        runner = RUNNER.format(vocab=getattr(vocab, "vocab_size", 2), device=cli.device(args))
        (out / "run_package.py").write_text(runner)
    if "onnx" not in args.skip:
        if importlib.util.find_spec("onnxruntime") is None:
            raise OSError("ONNX needs onnxruntime: pip install 'functional_llm[export]' "
                          "(or --skip onnx)")  # fmt: skip
        import onnxruntime

        ex.to_onnx(program, out / "model.onnx")
        session = onnxruntime.InferenceSession(str(out / "model.onnx"))
        arrays = [x.cpu().numpy() for x in inputs]  # onnxruntime's CPU provider
        feeds = {i.name: x for i, x in zip(session.get_inputs(), arrays, strict=True)}
        runners["onnxruntime"] = lambda: session.run(None, feeds)
    for name in names:
        if (out / name).exists():
            print(f"{out / name}: {(out / name).stat().st_size / 2**20:.2f} MiB")
    with torch.no_grad():
        reference = _flat(fn(params, *inputs))
        table = {}
        for name, run in runners.items():
            error = float((_flat(run()) - reference).abs().max())
            table[name] = {"ms": _median_ms(run, args.repeats), "max_abs_diff": error}
    eager = table["eager"]["ms"]
    print(f"\nbatch {tuple(inputs[0].shape)}, median of {args.repeats}")
    print(f"{'format':<12} {'ms':>9} {'vs eager':>9} {'max |diff|':>11}")
    for name, row in table.items():
        print(f"{name:<12} {row['ms']:9.2f} {eager / row['ms']:8.2f}x {row['max_abs_diff']:11.2e}")
    return table


if __name__ == "__main__":
    cli.main_guard(main)
