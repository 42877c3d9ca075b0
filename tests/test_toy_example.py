"""The README's stand-alone example: combiners on a two-task regression outside RL."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "toy_regression.py"


def load_example():
    spec = importlib.util.spec_from_file_location("toy_regression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ntkmtl_balances_the_tasks_that_ls_leaves_unbalanced() -> None:
    example = load_example()
    ls_small, ls_large = example.train("ls", steps=300, lr=1.0, seed=0)
    ntk_small, ntk_large = example.train("ntkmtl", steps=300, lr=1.0, seed=0)
    # LS follows the task with the 100x larger gradient: the small task lags far behind.
    assert ls_small > 100 * ls_large
    # NTKMTL equalises w_i^2 lambda_i: both tasks progress at a comparable relative rate.
    assert 0.2 < ntk_small / ntk_large < 5.0
    assert ntk_small < ls_small
