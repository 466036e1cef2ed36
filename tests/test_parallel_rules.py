"""Rules and placements: pure checks, no processes."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard

from functional_llm import parallel

MESH = {"dp": 2, "tp": 4}


def test_megatron_rules_place_attention_and_mlp():
    rules = {"heads": "tp", "mlp": "tp", "embed": None, "head_dim": None}
    q = parallel.placements("q.w", (8, 4, 2), ("embed", "heads", "head_dim"), MESH, rules)
    down = parallel.placements("down.w", (16, 8), ("mlp", "embed"), MESH, rules)
    assert q == (Replicate(), Shard(1))  # column parallel
    assert down == (Replicate(), Shard(0))  # row parallel
    both = parallel.placements("x", (8, 16), ("embed", "mlp"), MESH, {"embed": "dp", "mlp": "tp"})
    assert both == (Shard(0), Shard(1))  # FSDP x TP
    split = parallel.placements("b", (16,), ("batch",), MESH, {"batch": ("dp", "tp")})
    assert split == (Shard(0), Shard(0))  # one dim over both axes


@pytest.mark.parametrize(
    "shape, axes, rules, message",
    [
        (
            (8, 8),
            ("embed", "mlp"),
            {"embed": "tp", "mlp": "tp"},
            "mesh axis 'tp' would shard dim 0",
        ),
        ((8,), ("mlp",), {"mlp": "pp"}, "maps to mesh axis 'pp'"),
        ((6, 8), ("mlp", "embed"), {"mlp": "tp"}, "size 6, which mesh axes ('tp',) (size 4)"),
        ((8,), ("mlp", "embed"), {}, "name 2 dims"),
    ],
)
def test_bad_placements_name_the_param_and_the_axis(shape, axes, rules, message):
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.up\.w") as err:
        parallel.placements("blocks.0.mlp.up.w", shape, axes, MESH, rules)
    assert message in str(err.value)


def test_strict_rules_reject_an_unmapped_axis():
    with pytest.raises(ValueError, match=r"'vocab' .* has no rule"):
        parallel.placements("embed.table", (8, 4), ("vocab", "embed"), MESH, {}, strict=True)
    assert parallel.placements("e", (8, 4), ("vocab", "embed"), MESH, {}) == (Replicate(),) * 2


def test_rules_validate_on_construction():
    with pytest.raises(TypeError, match="heads"):
        parallel.Rules({"heads": 2})
    rules = parallel.Rules({"batch": "dp"}, params={"embed": "dp"})
    assert rules.for_params() == {"batch": "dp", "embed": "dp"}
    with pytest.raises(ValueError, match="mesh axis 'dp', but the mesh has axes \\('tp',\\)"):
        rules.check_mesh({"tp": 2})


AXES = ["embed", "heads", "mlp", "vocab", None]


@given(
    dims=st.lists(st.tuples(st.sampled_from(AXES), st.integers(1, 4)), min_size=1, max_size=4),
    rules=st.dictionaries(st.sampled_from(AXES[:-1]), st.sampled_from(["dp", "tp", None])),
)
def test_placements_shard_each_mesh_axis_once_and_evenly(dims, rules):
    axes = tuple(a for a, _ in dims)
    shape = tuple(8 * m for _, m in dims)  # some sizes the mesh divides, some it does not
    shape = tuple(s if m != 3 else 6 for s, (_, m) in zip(shape, dims, strict=True))
    try:
        where = parallel.placements("p", shape, axes, MESH, rules)
    except ValueError as e:
        assert "p:" in str(e)
        return
    sharded = [p.dim for p in where if isinstance(p, Shard)]
    for name, p in zip(MESH, where, strict=True):
        if isinstance(p, Shard):
            assert rules.get(axes[p.dim]) == name  # placed by its rule
    for dim in set(sharded):
        ways = math.prod(n for n, p in zip(MESH.values(), where, strict=True) if p == Shard(dim))
        assert shape[dim] % ways == 0
    for dim, a in enumerate(axes):  # every ruled axis is sharded
        if rules.get(a) is not None:
            assert dim in sharded


def test_rules_for_a_mesh_are_megatron_and_optionally_fsdp():
    rules = parallel.Rules.for_mesh({"dp": 2, "tp": 2}, fsdp=True)
    tp = dict.fromkeys(("heads", "kv_heads", "mlp", "vocab"), "tp")
    assert dict(rules.rules) == {"batch": "dp", **tp}
    assert dict(rules.params) == {"embed": "dp"}
    assert dict(parallel.Rules.for_mesh({"tp": 4}).rules) == tp
    assert dict(parallel.Rules.for_mesh({"dp": 4}).params) == {}
