"""Importing the library changes nothing global in torch, and stays cheap.

Each check runs in a fresh interpreter, so what other tests imported or set does not count.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import functional_llm as fl


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_every_module_leaves_dynamo_config_and_dtensor_rules_unchanged():
    out = run(
        """
        import torch, torch._dynamo
        from torch.distributed.tensor import DTensor
        before = torch._dynamo.config.get_config_copy()
        rules = set(DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs)
        import functional_llm as fl
        for name in fl.__all__:
            getattr(fl, name)
        from functional_llm.parallel import checkpoint, ops, pipeline
        after = torch._dynamo.config.get_config_copy()
        changed = sorted(k for k in after if after[k] != before[k])
        added = set(DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs) - rules
        print(changed, sorted(map(str, added)))
        """
    )
    assert out == "[] []"


def test_import_loads_neither_dynamo_nor_distributed():
    out = run(
        """
        import sys
        import functional_llm as fl
        fl.models, fl.optim, fl.train, fl.losses, fl.checkpoint, fl.data
        print(sorted(m for m in ("torch._dynamo", "torch.distributed.tensor") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_weights_and_export_import_no_optional_library():
    out = run(
        """
        import sys
        import functional_llm as fl
        fl.interop.hf, fl.export, fl.data.load_tokenizer
        print(sorted(m for m in ("transformers", "onnx", "onnxruntime", "onnxscript")
                     if m in sys.modules))
        """
    )
    assert out == "[]"


def test_plan_registers_cpu_attention_sharding_once_made():
    out = run(
        """
        import torch
        from torch.distributed.tensor import DTensor
        import functional_llm as fl
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        known = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
        before = op in known
        fl.parallel.ops.register()
        fl.parallel.ops.register()  # idempotent
        print(before, op in known)
        """
    )
    assert out == "False True"


def test_matches_carries_the_mark_that_assume_constant_result_sets():
    # tree.matches marks itself as torch.compiler.assume_constant_result would, without
    # importing dynamo; if torch changes how the decorator marks a function, this fails.
    def probe(path: str) -> bool:
        return True

    marked = torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(marked).items()}
    assert added == {"_dynamo_marked_constant": True}
    assert fl.tree.matches._dynamo_marked_constant is True


def test_compile_traces_autograd_grad_whole_and_restores_the_setting():
    import torch._dynamo

    def grad_of_square(x):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad((x * x).sum(), [x])
        return g

    before = torch._dynamo.config.trace_autograd_ops
    got = fl.train.compile(grad_of_square, backend="eager")(torch.arange(3.0))
    assert torch.equal(got, 2 * torch.arange(3.0))  # one graph: fullgraph=True held
    assert torch._dynamo.config.trace_autograd_ops == before
    if not before:  # plain torch.compile cannot trace it whole without the setting
        torch._dynamo.reset()  # forget the graph compiled above for this code object
        with pytest.raises(Exception, match="autograd"):
            torch.compile(grad_of_square, backend="eager", fullgraph=True)(torch.arange(3.0))
