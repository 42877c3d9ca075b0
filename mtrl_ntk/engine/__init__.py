"""The extended-NTK engine: per-task Jacobians, Gramians and the combined update."""

from mtrl_ntk.engine.task_gradients import (
    EngineResult,
    LossFn,
    TaskGradientEngine,
    TaskJacobian,
    group_batch,
    per_task_jacobian,
)

__all__ = [
    "EngineResult",
    "LossFn",
    "TaskGradientEngine",
    "TaskJacobian",
    "group_batch",
    "per_task_jacobian",
]
