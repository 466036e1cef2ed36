"""Parallelism as explicit specs over the pure step, on PyTorch's distributed engine.

* :mod:`~functional_llm.parallel.mesh`: a named mesh from a dict (``make_mesh``);
* :mod:`~functional_llm.parallel.rules`: logical axis -> mesh axis rules and their checks;
* :mod:`~functional_llm.parallel.plan`: a :class:`Plan` shards and gathers pytrees and runs a
  step sharded (data parallel, FSDP, tensor parallel, and their combinations);
* :mod:`~functional_llm.parallel.pipeline`: pipeline stages run by
  ``torch.distributed.pipelining`` (GPipe, 1F1B);
* :mod:`~functional_llm.parallel.checkpoint`: sharded checkpoints with DCP, resharded on load.
"""

from functional_llm.parallel import checkpoint, pipeline
from functional_llm.parallel.mesh import init_distributed, make_mesh, mesh_shape
from functional_llm.parallel.plan import ACTIVATION_AXES, Plan, local
from functional_llm.parallel.rules import Rules, placements

__all__ = [
    "ACTIVATION_AXES",
    "Plan",
    "Rules",
    "checkpoint",
    "init_distributed",
    "local",
    "make_mesh",
    "mesh_shape",
    "pipeline",
    "placements",
]
