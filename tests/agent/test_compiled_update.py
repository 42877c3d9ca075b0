"""``MultiTaskSAC(compile=True)`` makes the eager agent's updates (torch.compile on the CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.combiners import make_combiner
from mtrl_ntk.replay import Batch

TASKS, PER_TASK, OBS, ACTIONS = 3, 4, 5, 2


def make_agent(compile: bool) -> MultiTaskSAC:
    torch.manual_seed(0)
    cfg = AgentConfig(hidden_dim=8, num_layers=1, task_embedding_dim=4)
    # LS on the critic: the compiled loss forward (and its AOTAutograd backward); NTKMTL
    # (n = 2) on the actor: the compiled vmapped Jacobian. With the TD target and the policy
    # log-probability, every function the agent compiles runs.
    return MultiTaskSAC(
        OBS, ACTIONS, TASKS, cfg, make_combiner("ls", TASKS),
        make_combiner("ntkmtl", TASKS, num_minibatches=2), "cpu", seed=0, compile=compile,
    )


def make_batch(seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(TASKS, PER_TASK, OBS, generator=generator),
        action=torch.rand(TASKS, PER_TASK, ACTIONS, generator=generator) * 2 - 1,
        reward=torch.randn(TASKS, PER_TASK, generator=generator),
        next_obs=torch.randn(TASKS, PER_TASK, OBS, generator=generator),
        done=torch.zeros(TASKS, PER_TASK),
    )


@pytest.mark.slow
def test_compiled_agent_makes_the_eager_agents_updates() -> None:
    eager, compiled = make_agent(compile=False), make_agent(compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for seed in range(2):
            expected, got = eager.update(make_batch(seed)), compiled.update(make_batch(seed))
            assert expected.keys() == got.keys()
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    for module in ("actor", "critic", "critic_target"):
        expected_params = dict(getattr(eager, module).named_parameters())
        for name, param in getattr(compiled, module).named_parameters():
            torch.testing.assert_close(param, expected_params[name], rtol=1e-4, atol=1e-6)
    functions = [
        compiled.critic_engine.forward_fn, compiled.actor_engine.jacobian_fn,
        compiled._td_target_fn, compiled._policy_log_prob_fn,
    ]
    assert all(function.compiled for function in functions)
