"""mtrl's warm-up burst (``train.warmup_burst``): how many updates each step makes."""

from __future__ import annotations

import pytest

from mtrl_ntk.update_schedule import updates_at_step


def mtrl_updates(num_train_steps: int, init_steps: int) -> list[tuple[int, int]]:
    """mtrl/experiment/multitask.py ``run``, transcribed: per loop step (0-based, before its
    simulation), the buffer's steps of transitions and the updates made."""
    schedule = []
    for step in range(num_train_steps):
        if step >= init_steps:
            num_updates = init_steps if step == init_steps else 1
            schedule.append((step, num_updates))  # the buffer holds `step` steps
    return schedule


@pytest.mark.parametrize("warmup", [1, 5, 50])
def test_the_burst_is_mtrls_updates_on_the_same_buffer(warmup: int) -> None:
    num_steps = 200
    # Ours: step k = k environment steps done (this one included); the update comes after
    # the step's transitions are stored, so the buffer holds k steps.
    ours = [(k, updates_at_step(k, warmup, True)) for k in range(1, num_steps + 1)]
    ours = [(k, n) for k, n in ours if n]
    theirs = mtrl_updates(num_steps, warmup)
    # The same buffer sizes get the same updates; mtrl's loop ends one step earlier.
    assert ours[:-1] == theirs
    assert ours[0] == (warmup, warmup) and all(n == 1 for _, n in ours[1:])


def test_without_the_burst_one_update_per_step_after_the_warmup() -> None:
    assert [updates_at_step(k, 3, False) for k in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert [updates_at_step(k, 0, True) for k in range(0, 3)] == [1, 1, 1]
