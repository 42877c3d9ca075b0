"""The multi-task SAC agent: networks (``models``) and the update (``sac``)."""

from mtrl_ntk.agent.models import (
    ARCHITECTURES,
    Actor,
    ActorOutput,
    CriticOutput,
    StackedLinear,
    TaskEncoder,
    TwinCritic,
    tanh_gaussian_sample,
)
from mtrl_ntk.agent.sac import AgentConfig, MultiTaskSAC

__all__ = [
    "ARCHITECTURES",
    "Actor",
    "ActorOutput",
    "AgentConfig",
    "CriticOutput",
    "MultiTaskSAC",
    "StackedLinear",
    "TaskEncoder",
    "TwinCritic",
    "tanh_gaussian_sample",
]
