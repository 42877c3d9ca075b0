"""Environment stage of the data path: Meta-World benchmarks, protocols and evaluation."""

from mtrl_ntk.envs.metaworld_env import (
    BACKENDS,
    BENCHMARK_TASKS,
    EnvWorkerError,
    Evaluator,
    MultiTaskEnv,
    Policy,
    StepResult,
    evaluate,
    evaluate_together,
    make_multitask_env,
)
from mtrl_ntk.envs.protocols import METAWORLD_MAX_PATH_LENGTH, PROTOCOLS, Protocol
from mtrl_ntk.envs.worker_pool import EnvProxy, EnvWorkerPool

__all__ = [
    "BACKENDS",
    "BENCHMARK_TASKS",
    "METAWORLD_MAX_PATH_LENGTH",
    "PROTOCOLS",
    "EnvProxy",
    "EnvWorkerError",
    "EnvWorkerPool",
    "Evaluator",
    "MultiTaskEnv",
    "Policy",
    "Protocol",
    "StepResult",
    "evaluate",
    "evaluate_together",
    "make_multitask_env",
]
