"""Gradient combiners: a registry of multi-task weightings built on the extended NTK.

``available_combiners()``, ``make_combiner(name, num_tasks, **params)`` and the
pure function ``combine(name, grads, **params)`` are the public entry points.
"""

from mtrl_ntk.combiners import (  # noqa: F401  (registration side effects)
    aligned_mtl,
    cagrad,
    dwa,
    fairgrad,
    famo,
    graddrop,
    imtlg,
    ls,
    mgda,
    moco,
    nashmtl,
    ntkmtl,
    pcgrad,
    rlw,
    si,
    uw,
)
from mtrl_ntk.combiners.base import (
    CombinerOutput,
    GradientCombiner,
    Need,
    TaskStats,
    available_combiners,
    combine,
    combiner_class,
    combiner_params,
    direction_from_output,
    make_combiner,
    register_combiner,
    stats_from_gradients,
)

__all__ = [
    "CombinerOutput",
    "GradientCombiner",
    "Need",
    "TaskStats",
    "available_combiners",
    "combine",
    "combiner_class",
    "combiner_params",
    "direction_from_output",
    "make_combiner",
    "register_combiner",
    "stats_from_gradients",
]
