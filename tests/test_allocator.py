"""retain_freed_memory: a pure step stops paying page faults for its fresh tensors.

Each case runs in a child process, since the setting is process-wide and one-way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import functional_llm as fl

# A step-like pattern: every step makes new tensors of the params' sizes (one of 64 MiB, above
# glibc's largest default mmap threshold of 32 MiB, and some of 4 MiB) and drops the old ones.
# It prints the minor page faults of each step and the pages the params hold.
STEPS = """
import json, resource, sys, torch
import functional_llm as fl
applied = fl.allocator.retain_freed_memory() if sys.argv[1] == "retain" else None
sizes = [16 * 2**20] + [2**20] * 6
params = [torch.ones(n) for n in sizes]
grads = [torch.ones(n) for n in sizes]
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    params = [p - 0.01 * g for p, g in zip(params, grads)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "pages": sum(sizes) * 4 // 4096}))
"""


def run_steps(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(fl.allocator.glibc() is None, reason="the setting is glibc's mallopt")
def test_retained_memory_removes_the_page_faults_of_a_pure_step() -> None:
    default, retained = run_steps("default"), run_steps("retain")
    assert retained["applied"] is True
    pages, big = default["pages"], 16 * 2**20 * 4 // 4096
    # glibc's default maps the 64 MiB tensor afresh every step: at least its pages fault
    assert min(default["faults"][2:]) >= big
    # retained, the steps after the first few reuse freed blocks: in five steps fewer pages are
    # touched for the first time than a quarter of one default step (the heap may still grow
    # by a block now and then)
    assert sum(retained["faults"][3:]) < 0.25 * pages, retained


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, 2**31])
def test_bad_limits_are_refused(limit) -> None:
    with pytest.raises(ValueError, match="retain_freed_memory"):
        fl.allocator.retain_freed_memory(limit)
