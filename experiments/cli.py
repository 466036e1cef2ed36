"""What the experiments share on the command line: flag types that validate when parsed,
resuming into a guarded output folder, the divergence guard, and one-line errors.

A user error (a bad flag, a data file that cannot be used, a folder that holds another run,
a run that diverged) ends with one line on stderr naming the flag, file or step, and a non-zero
exit code; a traceback means a bug of ours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from functional_llm import checkpoint, data, runs, train, tree
from functional_llm.interop.hf.mapping import MappingError
from functional_llm.nn import eval_shape
from functional_llm.types import Metrics


class Diverged(RuntimeError):
    """The loss or the gradient norm became non-finite."""


USER_ERRORS = (
    data.DataError, checkpoint.CheckpointError, runs.RunDirError, Diverged, OSError, MappingError
)  # fmt: skip


def main_guard(main: Callable[[], Any]) -> NoReturn:
    """Run ``main()`` as a command: user errors print one line and exit with 2 (3 for a
    diverged run); everything else propagates."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3 if isinstance(err, Diverged) else 2) from None
    raise SystemExit(0)


def _number(kind: type, low: float, low_ok: bool, high: float | None = None) -> Callable:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (value == low and not low_ok) or (high is not None and value >= high):
            bound = f">= {low}" if low_ok else f"> {low}"
            bound += "" if high is None else f" and < {high}"
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, False)
nonnegative_int = _number(int, 0, True)
positive_float = _number(float, 0.0, False)
nonnegative_float = _number(float, 0.0, True)
rate = _number(float, 0.0, True, 1.0)  # dropout, masking: a probability below 1


def mesh_spec(text: str) -> str:
    """``--mesh`` as ``axis=size`` pairs, e.g. ``dp=2,tp=2``: identifiers, sizes >= 1, no
    repeats."""
    seen = set()
    for item in text.split(","):
        name, eq, size = item.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected axis=size pairs such as dp=2 or dp=2,tp=2, got {item!r}"
            )
        if name in seen:
            raise argparse.ArgumentTypeError(f"{text!r}: axis {name!r} is given twice")
        seen.add(name)
    return text


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_spec(text: str) -> str:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine."""
    try:
        d = torch.device(text)
    except RuntimeError:
        msg = f"{text!r} is not a device (cpu, cuda, cuda:N, mps)"
        raise argparse.ArgumentTypeError(msg) from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    if d.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: expected cpu, cuda, cuda:N or mps")
    return text


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` (default: cuda when there is one, else cpu) and ``--dtype`` (the params')."""
    a = p.add_argument
    a("--device", type=device_spec, default=None,
      help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")  # fmt: skip
    a("--dtype", choices=tuple(DTYPES), default="float32", help="the params' dtype")


def device(args: argparse.Namespace) -> torch.device:
    """The run's device: ``--device``, else cuda when present, else cpu."""
    if args.device is not None:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype(args: argparse.Namespace) -> torch.dtype:
    return DTYPES[args.dtype]


def to_device(tree_: Any, where: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Every tensor of ``tree_`` on ``where``, floating ones in ``dtype`` if given (no copy
    when a tensor is already so)."""

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        cast = dtype is not None and x.is_floating_point()
        return x.to(where, dtype=dtype) if cast else x.to(where)

    return tree.map(move, tree_)


def on_device(fn: Callable[..., Any], where: torch.device) -> Callable[..., Any]:
    """``fn(state, batch)`` with the batch moved to ``where`` first (the data pipelines make
    batches on the CPU; a step or evaluation runs where the state is)."""
    if where.type == "cpu":
        return fn
    return lambda state, batch, *rest: fn(state, to_device(batch, where), *rest)


def loop_step(loss_fn: Any, opt: Any, args: argparse.Namespace, where: torch.device) -> Any:
    """The train step of an experiment's loop: gradients clipped to norm 1, the old state
    donated (the loop never reads it again: AdamW's fused in-place update) unless
    ``--skip-nonfinite`` must keep it, and batches moved to ``where``."""
    skip = args.skip_nonfinite
    step = train.make_step(loss_fn, opt, clip_norm=1.0, skip_nonfinite=skip, donate=not skip)
    return on_device(step, where)


def add_run_args(p: argparse.ArgumentParser, *, resume: bool = True) -> None:
    """``--overwrite`` (and ``--resume``): what to do with an output folder that holds a run."""
    a = p.add_argument
    if resume:
        a("--resume", action="store_true", help="continue from the newest intact checkpoint")
    a("--overwrite", action="store_true", help="replace the run in out-dir (its outputs only)")
    a("--skip-nonfinite", action="store_true",
      help="skip a step whose loss or gradient is not finite (default: stop)")  # fmt: skip


def resume(
    ckpts: checkpoint.Checkpointer, like: Any, say: Callable[[str], None] = print
) -> checkpoint.Restored | None:
    """The newest intact checkpoint (saying which, and which newer ones were passed over), or
    None; a folder that holds files but no checkpoint cannot be resumed."""
    restored = ckpts.restore(like)
    if restored is None:
        out = ckpts.directory.parent
        held = sorted(p.name for p in out.iterdir() if p != ckpts.directory) if out.is_dir() else []
        if held:
            raise runs.RunDirError(
                f"--resume: {out} holds {', '.join(held[:4])} but no checkpoint to resume; "
                "pass --overwrite to start over"
            )
        say(f"--resume: no checkpoint in {ckpts.directory}; starting from step 0")
        return None
    for path, why in restored.skipped:
        say(f"--resume: passed over {path.name}: {why}")
    say(f"resuming from {ckpts.path(restored.step)} (step {restored.step})")
    return restored


def resume_with_tokenizer(
    ckpts: checkpoint.Checkpointer, tokenizer_file: Path, template: Callable[[Any], Any]
) -> tuple[checkpoint.Restored | None, Any]:
    """``--resume`` for a run whose state depends on its tokenizer: the newest intact
    checkpoint, read into ``template(tokenizer)`` built from the tokenizer that checkpoint
    recorded (on the meta device: the template gives the layout, the file the values), and
    that tokenizer (checked against the run's ``tokenizer.json``); ``(None, None)`` when there
    is nothing to resume."""
    recorded: dict[str, Any] = {}

    def like(meta: dict[str, Any]) -> Any:
        saved = meta.get("tokenizer")
        if saved is None:  # a checkpoint written before checkpoints held the tokenizer
            saved = data.load_tokenizer(tokenizer_file).to_json()
        recorded["tokenizer"] = saved
        tok = data.tokenizer_from_json(saved, "the checkpoint's tokenizer")
        return eval_shape(template, tok)  # shapes and dtypes only: no second init

    restored = resume(ckpts, like)
    if restored is None:
        return None, None
    return restored, same_tokenizer(tokenizer_file, recorded["tokenizer"])


def agreed_stop(stop: runs.Stop, done: int, every: int) -> bool:
    """Whether to stop after step ``done``. In one process, whenever a stop was asked for;
    across ranks, at every ``every``-th step, where the ranks agree (a signal may reach only
    some of them), so that all of them save and leave at the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(stop)
    if done % every:
        return False
    flag = torch.tensor(float(bool(stop)))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def leave(stop: runs.Stop, done: int, save: Callable[[int], Path], bar: Any = None,
          say: Callable[[str], None] = print) -> NoReturn:  # fmt: skip
    """An interrupted run's exit: save step ``done``, say where in one line, and exit with the
    signal's code (1 when the signal reached another rank)."""
    path = save(done)
    if bar is not None:
        bar.close()
    say(f"stopped by {stop.signal or 'a signal to another rank'} after step {done}: saved "
        f"{path}; continue with --resume")  # fmt: skip
    raise SystemExit(stop.exit_code if stop else 1)


def newest_checkpoint(run: Path, hint: str = "") -> checkpoint.Restored:
    """The newest intact checkpoint of the run folder ``run`` (read without a template), or a
    ``CheckpointError`` naming the folder, followed by ``hint`` (what makes one)."""
    restored = checkpoint.Checkpointer(run / "checkpoints").restore()
    if restored is None:
        raise checkpoint.CheckpointError(f"{run}: no checkpoint in {run / 'checkpoints'}{hint}")
    return restored


def trained_params(model: Any, saved: Any) -> Any:
    """``model``'s params in a checkpoint read without a template: a training checkpoint's
    ``TrainState`` params (``{"state": ...}``) or a params-only one (``{"params": ...}``), laid
    out as ``model``'s tree (its meta-tensor ``shapes()``, no init) and checked against it."""
    raw = saved["state"][0] if "state" in saved else saved["params"]  # TrainState.params
    params = tree.unflatten(tree.flatten(raw), like=model.shapes())
    model.check(params)
    return params


def same_tokenizer(path: Path, saved: dict[str, Any]) -> Any:
    """The tokenizer a checkpoint recorded; ``path`` (the run's ``tokenizer.json``) is written
    from it when missing, and must agree with it when present."""
    tok = data.tokenizer_from_json(saved, "the checkpoint's tokenizer")
    if not path.exists():
        tok.save(path)
    elif data.load_tokenizer(path).to_json() != saved:
        raise runs.RunDirError(
            f"{path} differs from the tokenizer the checkpoint was trained with (edited or "
            "replaced?); remove it to have it written again from the checkpoint"
        )
    return tok


class Guard:
    """Watches every step for a non-finite loss or gradient norm without a host sync, and
    stops the run where it syncs anyway (:meth:`check`: logging, evaluation, checkpoints).
    With ``skip`` the step itself skips such updates, and the guard only counts them."""

    def __init__(self, skip: bool) -> None:
        self.skip, self.first, self.skipped = skip, None, torch.zeros(())

    def watch(self, step: int, metrics: Metrics) -> None:
        if self.skip:
            self.skipped = self.skipped + metrics["skipped"]
        else:
            self.first = train.first_nonfinite(self.first, step, metrics)

    def check(self) -> None:
        if self.first is not None and (bad := int(self.first)) >= 0:
            raise Diverged(
                f"the loss or gradient norm became non-finite at step {bad}; the run stopped and "
                "saved nothing after it (lower --lr, or pass --skip-nonfinite to skip such steps)"
            )


def plot_losses(records: list[dict], path: Path) -> None:
    """The batch loss and the evaluations of a pretraining run's whole history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train (batch)")
    for name in ("train_loss", "val_loss"):
        ax.plot([r["step"] for r in evals], [r[name] for r in evals], "o-", label=name)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
