"""Pipeline parallelism: a model cut into stages along a ``pp`` mesh axis, run by
``torch.distributed.pipelining`` (GPipe, 1F1B, and its other schedules).

The engine wants an ``nn.Module`` per stage; :class:`StageModule` is the thin adapter: it holds
one stage's params as ``nn.Parameter`` aliases for one step and calls the pure stage function.
Everything around it stays functional::

    stages = model.stages(2)                         # each family cuts itself (models.stages)
    step = parallel.pipeline.PipelineStep(stages, mesh, opt, n_microbatches=4, schedule="1F1B")
    state = step.init_state(params, key)             # this rank's stage: params and opt state
    state, metrics = step(state, batch)              # metrics["loss"] on every rank

Stage ``s`` of ``pp`` runs ``stages[s]``; ``split(batch)`` gives the first stage's input and the
targets (:func:`next_token` by default, :func:`masked_lm` for BERT, :func:`seq2seq` for the
encoder-decoder, whose first stage takes two inputs), the last stage returns
logits and the schedule applies ``cross_entropy`` (``IGNORE`` not counted) per micro-batch;
gradients are the mean over micro-batches (the schedule's ``scale_grads``), which equals the
full batch's gradient when micro-batches count the same number of tokens. With a ``dp`` axis
too, each data-parallel replica of the pipeline takes its share of the batch and DTensor
averages the gradients over ``dp``. A weight used by two stages (GPT-2's tied embedding, in the
first and the last) is held by both; their gradients are summed over ``pp`` so both copies take
the same update. :meth:`PipelineStep.gather` gives every rank the full params again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor, Partial, Replicate

from functional_llm import losses, tree
from functional_llm.models.stages import Stage
from functional_llm.optim.base import GradientTransformation, update_and_apply
from functional_llm.optim.clipping import clip_factor, global_norm
from functional_llm.train import TrainState
from functional_llm.types import PyTree

__all__ = ["SCHEDULES", "PipelineStep", "StageModule", "masked_lm", "next_token", "seq2seq"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def next_token(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's first-stage input and targets: ``inputs`` and ``targets``, or
    ``tokens[:, :-1]`` and ``tokens[:, 1:]`` (the batches :func:`functional_llm.losses.next_token`
    takes)."""
    if "tokens" not in batch:
        return batch["inputs"], batch["targets"]
    tokens = batch["tokens"]
    return tokens[:, :-1], tokens[:, 1:]


def masked_lm(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A masked LM's: the (masked) ``tokens`` and their ``labels`` (``IGNORE`` where unmasked)."""
    return batch["tokens"], batch["labels"]


def seq2seq(
    batch: Mapping[str, torch.Tensor],
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An encoder-decoder's: ``(src, tgt_in)`` and ``tgt_out`` (as
    :func:`functional_llm.losses.seq2seq` takes them)."""
    return (batch["src"], batch["tgt_in"]), batch["tgt_out"]


class StageModule(nn.Module):
    """The adapter ``torch.distributed.pipelining`` needs: ``forward(x) = apply(params, x)``
    with the params registered as parameters. :meth:`load` swaps in a step's params as fresh
    leaf aliases (no copy); the engine's backward leaves their gradients in ``.grad``."""

    def __init__(self, apply: Callable[..., Any], params: PyTree):
        super().__init__()
        self._apply_fn = apply
        self._like = params
        self.load(params)

    def load(self, params: PyTree) -> None:
        self._paths = list(tree.flatten(params))
        for i, x in enumerate(tree.leaves(params)):
            self._parameters[f"p{i}"] = nn.Parameter(
                x.detach(), requires_grad=x.is_floating_point()
            )

    def _tree(self, leaves: list[torch.Tensor]) -> PyTree:
        """``leaves`` (in the loaded params' order) as a pytree of the params' structure."""
        return tree.unflatten(dict(zip(self._paths, leaves, strict=True)), self._like)

    def _loaded(self) -> list[torch.Tensor]:
        return [cast(nn.Parameter, self._parameters[f"p{i}"]) for i in range(len(self._paths))]

    def grads(self) -> PyTree:
        """The gradients of the loaded params (zeros where none flowed)."""
        return self._tree(
            [torch.zeros_like(p) if p.grad is None else p.grad for p in self._loaded()]
        )

    def forward(self, *activations: torch.Tensor) -> Any:
        return self._apply_fn(self._tree(self._loaded()), *activations)


class PipelineStep:
    """A train step for this rank's stage: ``(state, batch) -> (state, metrics)``; ``split``
    takes the batch apart into the first stage's input and the targets (:func:`next_token`:
    ``batch["tokens"]: (B, T+1)``, as :func:`functional_llm.losses.next_token`). ``mesh`` has a
    ``pp`` axis and optionally ``dp``; every rank passes the same full batch."""

    def __init__(
        self,
        stages: list[Stage],
        mesh: DeviceMesh,
        optimizer: GradientTransformation,
        *,
        n_microbatches: int,
        schedule: str = "1f1b",
        clip_norm: float | None = None,
        split: Callable[[Mapping[str, torch.Tensor]], tuple[Any, torch.Tensor]] = next_token,
        device: torch.device | str = "cpu",
    ) -> None:
        names = mesh.mesh_dim_names or ()
        if "pp" not in names or set(names) - {"pp", "dp"}:
            raise ValueError(
                f"PipelineStep: the mesh needs a 'pp' axis (and optionally 'dp'), got {names}"
            )
        if mesh["pp"].size() != len(stages):
            raise ValueError(
                f"PipelineStep: {len(stages)} stages for a pp axis of {mesh['pp'].size()}"
            )
        if schedule.lower() not in SCHEDULES:
            raise ValueError(
                f"PipelineStep: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}"
            )
        self.mesh, self.optimizer, self.clip_norm, self.split = mesh, optimizer, clip_norm, split
        self.pp_mesh = mesh["pp"]
        self.dp_mesh = mesh["dp"] if "dp" in names else None
        self.index = self.pp_mesh.get_local_rank()
        self.stages, self.stage = stages, stages[self.index]
        self.n_stages, self.n_microbatches = len(stages), n_microbatches
        self.schedule_cls, self.device = SCHEDULES[schedule.lower()], torch.device(device)
        self._module: StageModule | None = None
        self._schedule: Any = None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1

    def init_state(self, params: PyTree, key: torch.Tensor) -> TrainState:
        """This stage's share of the full ``params``, its optimizer state, step 0."""
        own = self.stage.select(params)
        return TrainState(own, self.optimizer.init(own), torch.zeros((), dtype=torch.int64), key)

    def _build(self, params: PyTree) -> StageModule:
        """This stage's module (holding ``params``) and the schedule that runs it."""
        module = StageModule(self.stage.apply, params)
        stage = PipelineStage(
            module, self.index, self.n_stages, self.device, group=self.pp_mesh.get_group()
        )

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return losses.cross_entropy(logits, targets)[0]

        self._schedule = self.schedule_cls(stage, self.n_microbatches, loss_fn=loss)
        return module

    def gather(self, params: PyTree, like: PyTree) -> PyTree:
        """The full model's params on every rank of the pipeline, from each stage's share
        (``params``, this rank's); ``like`` is a full params tree (e.g. ``model.init``'s) that
        gives the structure, shapes and dtypes. One broadcast per param over ``pp``."""
        group = self.pp_mesh.get_group()
        ranks = dist.get_process_group_ranks(group)
        own = tree.flatten(params)
        full: dict[str, torch.Tensor] = {}
        for s, stage in enumerate(self.stages):
            for path, x in tree.flatten(stage.select(like)).items():
                buffer = own[path].contiguous() if s == self.index else torch.empty_like(x)
                dist.broadcast(buffer, src=ranks[s], group=group)
                full[stage.full_path(path)] = buffer
        return tree.unflatten(full, like)

    def _reduce(self, x: torch.Tensor, mesh: DeviceMesh, op: str) -> torch.Tensor:
        """``x`` summed (or averaged) over ``mesh``, by DTensor (a Partial made Replicate)."""
        return (
            DTensor.from_local(x, mesh, [Partial(op)]).redistribute(mesh, [Replicate()]).to_local()
        )

    def __call__(
        self, state: TrainState, batch: Mapping[str, torch.Tensor]
    ) -> tuple[TrainState, dict]:
        inputs, y = self.split(batch)
        xs = inputs if isinstance(inputs, tuple) else (inputs,)
        if (dp := self.dp_mesh) is not None:  # this replica's share of the batch
            share = lambda t: t.chunk(dp.size())[dp.get_local_rank()]  # noqa: E731
            xs, y = tuple(share(t) for t in xs), share(y)
        if self._module is None:
            self._module = self._build(state.params)
        else:
            self._module.load(state.params)
        step_losses: list[torch.Tensor] = []
        if self.first:
            self._schedule.step(*xs, target=y if self.last else None, losses=step_losses)
        elif self.last:
            self._schedule.step(target=y, losses=step_losses)
        else:
            self._schedule.step()
        grads = self._module.grads()
        dp_mesh = self.dp_mesh
        for name in self.stage.shared:  # tied weights: both holders get the summed gradient
            grads[name] = tree.map(lambda g: self._reduce(g, self.pp_mesh, "sum"), grads[name])
        if dp_mesh is not None:
            grads = tree.map(lambda g: self._reduce(g, dp_mesh, "avg"), grads)
        norm = self._global_norm(grads)
        if self.clip_norm is not None:
            factor = clip_factor(norm, self.clip_norm)
            grads = tree.map(lambda g: g * factor.to(g.dtype), grads)
        params, opt_state = update_and_apply(self.optimizer, state.params, grads, state.opt_state)
        loss = torch.stack(step_losses).mean() if step_losses else torch.zeros(())
        loss = self._reduce(loss.detach(), self.pp_mesh, "sum")  # only the last stage's is nonzero
        if self.dp_mesh is not None:
            loss = self._reduce(loss, self.dp_mesh, "avg")
        metrics = {"loss": loss, "grad_norm": norm}
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    def _global_norm(self, grads: PyTree) -> torch.Tensor:
        """The norm over every stage's gradients (a tied weight counted once)."""
        sq = global_norm(grads).square()
        if self.stage.shared and not self.first:  # the first stage's copy stands for both
            sq = sq - sum(global_norm(grads[n]).square() for n in self.stage.shared)
        return self._reduce(sq, self.pp_mesh, "sum").sqrt()
