"""How many SAC updates the training loop performs at a step (``train.warmup_burst``).

After the random warm-up the loop makes one update per environment step. mtrl's loop
(``mtrl/experiment/multitask.py``, ``run``) does one thing more: at the step where the
warm-up ends it makes ``init_steps`` updates at once

    if step >= exp_config.init_steps:
        num_updates = exp_config.init_steps if step == exp_config.init_steps else 1

so its first policy acts after 1,500 updates on the warm-up's random transitions
(1,500 steps of all tasks), not after one. ``train.warmup_burst=true`` does the same:
the step that ends the warm-up makes ``warmup_steps`` updates; every later step one.
The Table-4 presets turn it on (``configs/table4/common.yaml``).

Steps are counted as the trainers count them: ``step`` is the number of environment
steps done, this one included, so the first update comes at ``step == warmup_steps``,
when the buffer holds the warm-up's ``warmup_steps`` steps of transitions, as mtrl's
buffer does at its ``step == init_steps`` (it updates before that step's simulation).
"""

from __future__ import annotations


def updates_at_step(step: int, warmup_steps: int, warmup_burst: bool) -> int:
    """The number of updates at ``step`` (environment steps done, this one included)."""
    if step < warmup_steps:
        return 0
    if warmup_burst and step == warmup_steps:
        return max(warmup_steps, 1)
    return 1
