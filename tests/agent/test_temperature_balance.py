"""The temperature losses through the combiner (``agent.balance=[critic, actor, alpha]``).

mtrl's gradient-manipulation agents (``mtrl/agent/grad_manipulation.py`` and its PCGrad,
CAGrad, Nash-MTL and FairGrad subclasses) call ``_compute_gradient(alpha_loss,
component_names=["log_alpha"])``: the per-task temperature losses go through the method
like the critic's and the actor's. With one shared temperature each task's gradient is a
scalar, so PCGrad projects every task's gradient onto a conflicting one's normal plane,
which in one dimension is 0: whenever the tasks' signs disagree the temperature does not
move (Adam's first step from a zero gradient is 0).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import Tensor

from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.combiners import make_combiner
from mtrl_ntk.opcount import count_ops
from tests.agent.batches import random_batch

TASKS, PER_TASK, OBS, ACTIONS = 3, 4, 3, 2
TINY = {"hidden_dim": 8, "num_layers": 1, "task_embedding_dim": 4, "arch": "obs_only"}
BALANCE_ALL = ("critic", "actor", "alpha")


def make_agent(name: str, balance: tuple[str, ...] = BALANCE_ALL, **settings) -> MultiTaskSAC:
    torch.manual_seed(0)
    cfg = AgentConfig(**{**TINY, "balance": balance, **settings})
    return MultiTaskSAC(
        OBS, ACTIONS, TASKS, cfg, make_combiner(name, TASKS), make_combiner(name, TASKS), "cpu"
    )


def with_entropy_gaps(agent: MultiTaskSAC, gaps: list[float]) -> None:
    """Make the update's log π give task i the mean entropy gap -log π - H̄ = gaps[i]."""
    gap = torch.tensor(gaps).unsqueeze(1).expand(TASKS, PER_TASK)
    agent.policy_log_prob = lambda obs, task_ids, noise, encoding=None: (  # type: ignore
        -gap - agent.target_entropy
    )


def temperature_step(agent: MultiTaskSAC, gaps: list[float]) -> Tensor:
    with_entropy_gaps(agent, gaps)
    before = agent.log_alpha.detach().clone()
    metrics = agent.update(random_batch(TASKS, PER_TASK, OBS, ACTIONS, seed=1))
    assert bool(metrics["finite"])
    return agent.log_alpha.detach() - before


def test_pcgrad_freezes_a_shared_temperature_when_the_tasks_disagree_in_sign() -> None:
    agent = make_agent("pcgrad")
    assert agent.alpha_combiner.name == "pcgrad"
    assert agent.alpha_combiner is not agent.actor_combiner  # its own instance and state
    assert torch.equal(temperature_step(agent, [0.5, -0.2, 1.0]), torch.zeros(1))
    # The same disagreement, averaged (LS, the temperature not in balance): it moves.
    averaged = make_agent("pcgrad", balance=("critic", "actor"))
    assert averaged.alpha_combiner.name == "ls"
    assert (temperature_step(averaged, [0.5, -0.2, 1.0]).abs() > 0).all()
    # Agreeing signs: PCGrad projects nothing and the temperature moves against the gap.
    agreeing = make_agent("pcgrad")
    assert (temperature_step(agreeing, [0.5, 0.2, 1.0]) < 0).all()


@pytest.mark.parametrize("name", ["cagrad", "nashmtl", "fairgrad"])
def test_the_gramian_methods_weigh_the_temperature_and_report_it(name: str) -> None:
    agent = make_agent(name)
    with_entropy_gaps(agent, [0.5, 0.2, 1.0])
    metrics = agent.update(random_batch(TASKS, PER_TASK, OBS, ACTIONS, seed=1))
    assert bool(metrics["finite"])
    assert metrics["alpha_weights"].shape == (TASKS,)
    assert torch.isfinite(metrics["alpha_weights"]).all()
    assert "alpha_gramian" not in metrics and "alpha_solver_fallback" in metrics


@pytest.mark.parametrize("name", ["famo", "uw", "si", "dwa", "moco"])
def test_methods_for_positive_losses_stay_off_the_temperature(name: str) -> None:
    agent = make_agent(name)
    assert agent.alpha_combiner.name == "ls" and agent.actor_combiner.name == "ls"
    assert agent.critic_combiner.name == name


def test_a_method_that_needs_a_representation_is_refused_on_the_temperature() -> None:
    with pytest.raises(ValueError, match="leave 'alpha' out of agent.balance"):
        make_agent("ntkmtl_sr")


def test_the_temperature_combiners_state_is_in_the_checkpoint() -> None:
    agent = make_agent("pcgrad")
    state = agent.state_dict()
    assert "random" in state["alpha_combiner"]
    restored = make_agent("pcgrad")
    restored.load_state_dict(state)
    batch = random_batch(TASKS, PER_TASK, OBS, ACTIONS, seed=2)
    first, second = agent.update(batch), restored.update(batch)
    torch.testing.assert_close(first["alpha"], second["alpha"], rtol=0, atol=0)
    # A checkpoint from before the temperature's combiner (no key) still loads.
    del state["alpha_combiner"]
    make_agent("pcgrad").load_state_dict(state)


# -- capture: no host sync, one graph, the same updates in a seed group ----------------------


def test_a_balanced_temperature_keeps_the_update_captured() -> None:
    name = "pcgrad"  # a Gramian method with random numbers: the whole contract
    from tests.agent import test_captured_update as captured

    torch._dynamo.reset()
    cfg = dataclasses.replace(captured.CONFIG, balance=BALANCE_ALL)
    agent = captured.make_agent(name, cfg=cfg)
    assert agent.alpha_combiner.name == name
    agent.update(captured.make_batch(0))
    _, counter = count_ops(agent.update, captured.make_batch(1))
    assert counter.syncs == 0, dict(counter.sync_names)
    eager, compiled = (
        captured.make_agent(name, cfg=cfg),
        captured.make_agent(name, compile=True, cfg=cfg),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for seed in range(3):
            expected = eager.update(captured.make_batch(seed))
            got = compiled.update(captured.make_batch(seed))
    assert compiled._update_fn.compiled
    captured.assert_same_state(got, expected, "metrics")
    captured.assert_same_state(compiled.state_dict(), eager.state_dict())


def test_a_balanced_temperature_in_a_seed_group_makes_each_seeds_updates() -> None:
    from tests.agent import test_seed_group as grouped

    group, alone = grouped.run_alongside("pcgrad", cfg=grouped.config(balance=BALANCE_ALL))
    for member, single in zip(group.agents, alone):
        assert member.alpha_combiner.name == "pcgrad"
        grouped.assert_same_agent_state(member, single, loose=False)


@pytest.mark.parametrize(
    ("name", "params"),
    [("cagrad", {"c": 0.9, "solver": "sgd"}), ("fairgrad", {"alpha": 2.0, "solver": "sgd"})],
)
def test_the_authors_sgd_solvers_on_all_three_losses_in_a_seed_group(
    name: str, params: dict
) -> None:
    """The CAGrad and FairGrad Table-4 rows' setting: each seed of a group (one vmapped,
    host-sync-free update) makes the updates it makes alone."""
    from mtrl_ntk.agent.seeds import SeedGroupSAC
    from tests.agent import test_seed_group as grouped

    cfg = grouped.config(arch="obs_only", balance=BALANCE_ALL)

    def agent(seed: int) -> MultiTaskSAC:
        torch.manual_seed(seed)
        combiners = [make_combiner(name, grouped.TASKS, **params) for _ in range(3)]
        return MultiTaskSAC(
            grouped.OBS,
            grouped.ACTIONS,
            grouped.TASKS,
            cfg,
            combiners[0],
            combiners[1],
            "cpu",
            alpha_combiner=combiners[2],
            seed=100 + seed,
        )

    group = SeedGroupSAC([agent(seed) for seed in (0, 1)])
    alone = [agent(seed) for seed in (0, 1)]
    assert group.agents[0].alpha_combiner.solver == "sgd"
    for step in range(3):
        batches = [grouped.make_batch(step, seed) for seed in (0, 1)]
        metrics, counter = count_ops(group.update, batches)
        assert counter.syncs == 0, dict(counter.sync_names)
        for index, (single, batch) in enumerate(zip(alone, batches)):
            grouped.assert_same_state(
                grouped.seed_metrics(metrics, index), single.update(batch), f"metrics {step}"
            )
    for member, single in zip(group.agents, alone):
        grouped.assert_same_agent_state(member, single, loose=False)
