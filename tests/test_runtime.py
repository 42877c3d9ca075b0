"""``tune_cpu_allocator`` makes freed tensor memory reusable without page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Three 20 MB tensors freed together: more than glibc's default trim threshold, so by default
# the memory goes back to the kernel and the next round faults every page in again.
_SCRIPT = """
import json, resource, torch
from mtrl_ntk.runtime import tune_cpu_allocator

# One thread: intra-op threads filling the blocks would touch memory from their own malloc
# arenas, whose reuse depends on scheduling (a loaded machine made this test flaky).
torch.set_num_threads(1)

def faults_per_round(rounds=6):
    def one_round():
        blocks = [torch.ones(5_000_000) for _ in range(3)]
        return sum(float(block[0]) for block in blocks)
    for _ in range(3):  # the heap grows to its working size
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

default = faults_per_round()
applied = tune_cpu_allocator()
print(json.dumps({"default": default, "applied": applied, "tuned": faults_per_round()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_tuned_allocator_reuses_large_blocks_without_page_faults() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["applied"] is True
    pages_per_round = 3 * 20_000_000 // 4096
    # By default 10-90% of the pages fault in again every round (glibc adapts its thresholds
    # as it goes); once tuned, the grown heap is reused. How much is reused depends on the
    # heap's layout, which differs between otherwise identical venvs: seen here, tuned
    # rounds fault 0%, 11% or 22% of the pages in again where the default faults 11-67%.
    # So the test asks for what holds in all of them: at least half the faults go away.
    assert result["default"] > 0.05 * pages_per_round, result  # the test measures something
    assert result["tuned"] <= 0.5 * result["default"], result
