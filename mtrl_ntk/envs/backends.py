"""The env backends by name (`env.backend`): which class builds an env, and what each can serve.

The one place that answers "can this backend run here, and reproduce this protocol?":
`mtrl_ntk.config` asks it while validating a run's config (a ConfigError before any
work), and every env asks its own class again when it is built.
"""

from __future__ import annotations

from mtrl_ntk.envs.envpool_env import EnvPoolMultiTaskEnv
from mtrl_ntk.envs.interface import MultiTaskEnvBase, check_choice
from mtrl_ntk.envs.metaworld_env import MultiTaskEnv
from mtrl_ntk.envs.protocols import Protocol
from mtrl_ntk.envs.spec import EnvSpec

BACKEND_CLASSES: dict[str, type[MultiTaskEnvBase]] = {
    "metaworld": MultiTaskEnv,
    "envpool": EnvPoolMultiTaskEnv,
}
BACKENDS = tuple(BACKEND_CLASSES)
"""`env.backend`: Meta-World's Python environments, or EnvPool's C++ ports of them
(`mtrl_ntk.envs.envpool_env`; it serves only the protocols it can reproduce)."""


def backend_class(backend: str) -> type[MultiTaskEnvBase]:
    check_choice("env.backend", backend, list(BACKENDS))
    return BACKEND_CLASSES[backend]


def serving_problem(backend: str, protocol: Protocol) -> str | None:
    """Why `backend` cannot run `protocol` here (its package missing, or a protocol it
    cannot reproduce), as one sentence naming both; None when it can."""
    cls = backend_class(backend)
    unavailable = cls.unavailable_reason()
    if unavailable is not None:
        return f"env.backend={backend}: {unavailable}"
    unsupported = cls.unsupported_reason(protocol)
    if unsupported is not None:
        others = [name for name in BACKENDS if name != backend]
        return (
            f"env.backend={backend} cannot serve protocol={protocol.name}: {unsupported}; "
            f"use env.backend={' or '.join(others)} or another protocol"
        )
    return None


def make_multitask_env(spec: EnvSpec) -> MultiTaskEnvBase:
    """The multi-task env `spec` describes, on its backend; same interface either way."""
    return backend_class(spec.backend).from_spec(spec)
