"""Environment stage of the data path: Meta-World benchmarks, protocols and evaluation.

Who does what: `spec` (the env asked for: `EnvSpec`, `BENCHMARK_TASKS`), `protocols`
(the presets), `interface` (the declared env interface and the base every backend
shares), one module per backend (`metaworld_env`, `envpool_env`), `backends` (the
registry: a backend by name, and what it can serve), `evaluation`, `worker_pool`
(envs hosted in worker processes, behind the same interface), `episodes` (per-step
bookkeeping).
"""

from mtrl_ntk.envs.backends import BACKENDS, backend_class, make_multitask_env, serving_problem
from mtrl_ntk.envs.episodes import StepResult
from mtrl_ntk.envs.evaluation import (
    Evaluator,
    MakeEnv,
    Policy,
    evaluate,
    evaluate_together,
)
from mtrl_ntk.envs.interface import MultiTaskEnvBase, MultiTaskEnvInterface
from mtrl_ntk.envs.metaworld_env import MultiTaskEnv
from mtrl_ntk.envs.protocols import METAWORLD_MAX_PATH_LENGTH, PROTOCOLS, Protocol
from mtrl_ntk.envs.spec import BENCHMARK_TASKS, EnvSpec, VectorStrategy
from mtrl_ntk.envs.worker_pool import EnvProxy, EnvWorkerPool
from mtrl_ntk.errors import EnvWorkerError

__all__ = [
    "BACKENDS",
    "BENCHMARK_TASKS",
    "METAWORLD_MAX_PATH_LENGTH",
    "PROTOCOLS",
    "EnvProxy",
    "EnvSpec",
    "EnvWorkerError",
    "EnvWorkerPool",
    "Evaluator",
    "MakeEnv",
    "MultiTaskEnv",
    "MultiTaskEnvBase",
    "MultiTaskEnvInterface",
    "Policy",
    "Protocol",
    "StepResult",
    "VectorStrategy",
    "backend_class",
    "evaluate",
    "evaluate_together",
    "make_multitask_env",
    "serving_problem",
]
