"""Path-aware pytree helpers."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_llm import tree

names = st.text("abcdefgh_", min_size=1, max_size=4)
leaves = st.builds(lambda n: torch.arange(float(n)), st.integers(0, 4))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(names, children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=12,
)

PARAMS = {
    "embed": {"table": torch.zeros(10, 4)},
    "blocks": [
        {"attn": {"wq": torch.ones(4, 4), "b": torch.zeros(4)}, "norm": {"scale": torch.ones(4)}},
        {"attn": {"wq": torch.ones(4, 4), "b": torch.zeros(4)}, "norm": {"scale": torch.ones(4)}},
    ],
}


def same(a, b):
    return tree.structure(a) == tree.structure(b) and all(
        torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b), strict=True)
    )


def test_paths_are_dotted_and_ordered_like_leaves():
    assert tree.paths(PARAMS) == [
        "blocks.0.attn.b", "blocks.0.attn.wq", "blocks.0.norm.scale",
        "blocks.1.attn.b", "blocks.1.attn.wq", "blocks.1.norm.scale", "embed.table",
    ]  # fmt: skip
    assert list(tree.flatten(PARAMS).values())[-1] is PARAMS["embed"]["table"]


@given(trees)
def test_flatten_unflatten_round_trip(t):
    assert same(tree.unflatten(tree.flatten(t), like=t), t)


def test_unflatten_without_template_rebuilds_lists_and_dicts():
    assert same(tree.unflatten(tree.flatten(PARAMS)), PARAMS)


def test_unflatten_reports_missing_and_extra_paths():
    flat = tree.flatten(PARAMS)
    flat.pop("embed.table")
    flat["embed.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['embed.table'\], extra \['embed.extra'\]"):
        tree.unflatten(flat, like=PARAMS)


def test_map_with_path_sees_paths():
    shapes = tree.map_with_path(lambda p, x: (p, tuple(x.shape)), PARAMS)
    assert shapes["blocks"][1]["attn"]["wq"] == ("blocks.1.attn.wq", (4, 4))
    doubled = tree.map(lambda x, y: x + y, PARAMS, PARAMS)
    assert torch.equal(doubled["blocks"][0]["attn"]["wq"], 2 * torch.ones(4, 4))


def test_mask_and_select_by_glob_and_regex():
    assert list(tree.select(PARAMS, "*.norm.*")) == ["blocks.0.norm.scale", "blocks.1.norm.scale"]
    assert list(tree.select(PARAMS, "blocks.1.*", "embed.*")) == [
        "blocks.1.attn.b", "blocks.1.attn.wq", "blocks.1.norm.scale", "embed.table",
    ]  # fmt: skip
    assert list(tree.select(PARAMS, re.compile(r"\.b$"))) == ["blocks.0.attn.b", "blocks.1.attn.b"]
    m = tree.mask(PARAMS, "*wq")
    assert tree.leaves(m) == [False, True, False, False, True, False, False]


@given(trees, st.data())
def test_partition_combine_round_trip(t, data):
    flags = [data.draw(st.booleans()) for _ in tree.leaves(t)]
    where = tree.structure(t).unflatten(flags)
    selected, rest = tree.partition(t, where)
    picked = [x for x, f in zip(tree.leaves(t), flags, strict=True) if f]
    assert all(a is b for a, b in zip(tree.leaves(selected), picked, strict=True))
    assert same(tree.combine(selected, rest), t)
    assert tree.size(selected) + tree.size(rest) == tree.size(t)


def test_partition_by_predicate_freezes_norms():
    trainable, frozen = tree.partition(PARAMS, lambda path, x: "norm" not in path)
    assert frozen["blocks"][0]["norm"]["scale"] is PARAMS["blocks"][0]["norm"]["scale"]
    assert (
        frozen["blocks"][0]["attn"]["wq"] is None
        and trainable["blocks"][0]["norm"]["scale"] is None
    )
    assert tree.size(frozen) == 8


def test_size_nbytes_and_meta():
    assert tree.size(PARAMS) == 40 + 2 * (16 + 4 + 4)
    assert tree.nbytes(PARAMS) == 4 * tree.size(PARAMS)
    meta = tree.map(lambda x: x.to("meta").to(torch.bfloat16), PARAMS)
    assert tree.nbytes(meta) == 2 * tree.size(PARAMS)


def test_summary_lists_every_leaf_with_axes():
    axes = tree.map(lambda x: ("embed",) * x.ndim, PARAMS)
    text = tree.summary(PARAMS, axes)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "count", "axes"]
    row = next(line for line in lines if line.startswith("blocks.0.attn.wq"))
    assert row.split() == ["blocks.0.attn.wq", "4x4", "float32", "16", "embed,", "embed"]
    assert lines[-1].split()[:2] == ["total", "88"]


def test_partition_keeps_existing_holes():
    holey = {"a": torch.ones(1), "b": None, "c": torch.zeros(2)}
    selected, rest = tree.partition(holey, {"a": True, "b": True, "c": False})
    assert selected == {"a": holey["a"], "b": None, "c": None}
    assert rest == {"a": None, "b": None, "c": holey["c"]}


def test_map_with_path_sees_the_same_paths_compiled():
    """dynamo's polyfill of optree.tree_map_with_path passes wrong paths (torch 2.13); ours
    must not, since masks and labels are computed from paths inside compiled steps."""
    t = {"w": torch.ones(1), "a": {"b": torch.ones(1), "c": [torch.ones(1)]}}

    def tag(tree_):
        return tree.map_with_path(lambda p, x: x * (2.0 if p in ("w", "a.c.0") else 3.0), tree_)

    eager, compiled = tag(t), torch.compile(tag, fullgraph=True)(t)
    for path, x in tree.flatten(compiled).items():
        assert torch.equal(x, tree.flatten(eager)[path]), path
    assert float(compiled["a"]["c"][0]) == 2.0 and float(compiled["a"]["b"]) == 3.0
