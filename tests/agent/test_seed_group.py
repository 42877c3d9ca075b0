"""A seed group updates S agents as one vmapped call, and each seed as if it trained alone.

``SeedGroupSAC`` runs the single-seed ``update_graph`` under ``torch.func.vmap`` over
a seed axis. What that must not change, checked here on tiny networks: every
seed's state and metrics are those of the same agent updated alone (to float32
rounding: batched kernels round differently), for every combiner and
architecture; a seed's trajectory does not depend on the other seeds (their
number, their batches, a non-finite batch of theirs); acting, saving and loading
each agent work as for a single agent. And what the group is for: the number of
ops of one group update does not grow with S (no per-seed fallback of vmap), with
no host sync, eager or compiled as one graph.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from mtrl_ntk import foreach
from mtrl_ntk.agent import AgentConfig, MultiTaskSAC
from mtrl_ntk.agent.seeds import SeedGroupSAC, TensorSites
from mtrl_ntk.combiners import available_combiners, make_combiner
from mtrl_ntk.opcount import count_ops
from mtrl_ntk.replay import Batch
from tests.agent.batches import random_batch
from tests.agent.test_captured_update import assert_same_state

TASKS, PER_TASK, OBS, ACTIONS = 3, 4, 5, 2
SEEDS = (0, 1, 2)

# vmap runs an op without a batching rule once per seed, after this warning: the ops of
# a group update would then grow with S. Every test here treats it as a failure.
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    # As in test_captured_update.py: dynamo's recompile limit counts every compiled agent.
    torch._dynamo.reset()


def config(arch: str = "task_encoder", hidden_dim: int = 8, **changes: object) -> AgentConfig:
    return AgentConfig(
        arch=arch, hidden_dim=hidden_dim, num_layers=2, task_embedding_dim=4, **changes
    )


def make_agent(name: str, seed: int, cfg: AgentConfig | None = None) -> MultiTaskSAC:
    """Seed ``seed``'s agent: its initial weights, its combiners' generators (seeded from the
    global RNG) and its policy-noise generator all differ from another seed's."""
    torch.manual_seed(seed)
    params = {"num_minibatches": 2} if name.startswith("ntkmtl") else {}
    return MultiTaskSAC(
        OBS, ACTIONS, TASKS, cfg or config(), make_combiner(name, TASKS, **params),
        make_combiner(name, TASKS, **params), "cpu", seed=100 + seed,
    )


def make_batch(step: int, seed: int) -> Batch:
    """Seed ``seed``'s batch at update ``step``: every seed samples its own replay buffer."""
    return random_batch(TASKS, PER_TASK, OBS, ACTIONS, seed=1000 * seed + step)


def make_group(name: str, seeds: tuple[int, ...] = SEEDS, cfg: AgentConfig | None = None,
               **options: object) -> SeedGroupSAC:
    return SeedGroupSAC([make_agent(name, seed, cfg) for seed in seeds], **options)


def seed_metrics(metrics: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Seed ``index``'s slice of a group update's metrics."""
    return {key: value[index] for key, value in metrics.items()}


def assert_same_agent_state(got: MultiTaskSAC, expected: MultiTaskSAC, loose: bool) -> None:
    """``state_dict``s equal to float32 rounding (RNG states and counters exactly).

    ``loose``: FAMO's logits to 1e-4 only: their Adam-normalised gradient is a difference
    of log-losses before and after the step, which amplifies float32 rounding.
    """
    got_state, expected_state = got.state_dict(), expected.state_dict()
    if loose:
        torch.testing.assert_close(
            got_state["critic_combiner"].pop("logits"),
            expected_state["critic_combiner"].pop("logits"), rtol=1e-4, atol=1e-4,
            msg="famo logits",
        )
    assert_same_state(got_state, expected_state)


def run_alongside(
    name: str, cfg: AgentConfig | None = None, updates: int = 4
) -> tuple[SeedGroupSAC, list[MultiTaskSAC]]:
    """A group of seeds 0, 1, 2 and the same three agents updated alone on the same batches;
    every update's metrics must agree seed by seed."""
    group = make_group(name, cfg=cfg)
    alone = [make_agent(name, seed, cfg) for seed in SEEDS]
    for step in range(updates):
        batches = [make_batch(step, seed) for seed in SEEDS]
        grouped = group.update(batches)
        for index, (agent, batch) in enumerate(zip(alone, batches)):
            assert_same_state(seed_metrics(grouped, index), agent.update(batch), f"metrics {step}")
    return group, alone


@pytest.mark.parametrize("name", available_combiners())
def test_every_seed_of_a_group_makes_the_updates_it_makes_alone(name: str) -> None:
    group, alone = run_alongside(name)
    for grouped, single in zip(group.agents, alone):
        assert_same_agent_state(grouped, single, loose=name == "famo")
    # Not vacuous: the seeds started apart and stayed apart.
    first, second = (agent.actor.state_dict() for agent in group.agents[:2])
    assert not any(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("arch", ["mtsac", "multihead", "independent", "obs_only",
                                  "task_encoder"])
@pytest.mark.parametrize("name", ["ls", "ntkmtl", "nashmtl", "ntkmtl_sr", "famo"])
def test_every_architecture_in_a_group_makes_the_updates_alone(name: str, arch: str) -> None:
    group, alone = run_alongside(name, config(arch))
    for grouped, single in zip(group.agents, alone):
        assert_same_agent_state(grouped, single, loose=name == "famo")


@pytest.mark.parametrize("name", ["graddrop", "nashmtl"])
def test_a_seeds_trajectory_does_not_depend_on_the_other_seeds(name: str) -> None:
    three, one, alone = make_group(name, (0, 1, 2)), make_group(name, (1,)), make_agent(name, 1)
    for step in range(5):
        three.update([make_batch(step, seed) for seed in (0, 1, 2)])
        one.update([make_batch(step, 1)])
        alone.update(make_batch(step, 1))
    assert_same_agent_state(three.agents[1], alone, loose=False)
    assert_same_agent_state(one.agents[0], alone, loose=False)


@pytest.mark.parametrize("name", ["ls", "nashmtl", "famo"])
def test_a_non_finite_batch_skips_that_seeds_update_only(name: str) -> None:
    group = make_group(name)
    alone = [make_agent(name, seed) for seed in SEEDS]
    for step in range(2):
        batches = [make_batch(step, seed) for seed in SEEDS]
        group.update(batches)
        for agent, batch in zip(alone, batches):
            agent.update(batch)
    before = group.agents[1].state_dict()
    combiner_before = [t.clone() for t in group.agents[1].critic_combiner.state_tensors()]
    batches = [make_batch(2, seed) for seed in SEEDS]
    batches[1].reward[1, 0] = torch.nan
    metrics = group.update(batches)
    for agent, batch in zip(alone, batches):
        agent.update(batch)

    assert metrics["finite"].tolist() == [True, False, True]
    for grouped, single in zip(group.agents, alone):
        assert_same_agent_state(grouped, single, loose=name == "famo")
    after = group.agents[1].state_dict()
    for key in ("actor", "critic", "critic_target", "log_alpha", "actor_optimizer",
                "critic_optimizer", "alpha_optimizer"):
        assert_same_state(after[key], before[key], key)
    for tensor, old in zip(group.agents[1].critic_combiner.state_tensors(), combiner_before):
        assert torch.equal(tensor, old)
    skipped = [int(agent.health.skipped) for agent in group.agents]
    assert skipped == [0, 1, 0]
    # Seed 1's metrics are zeroed (a skipped update), the others' are not.
    assert (metrics["critic_loss"] != 0).tolist() == [True, False, True]


def test_group_act_is_each_agents_act_and_draws_from_each_agents_generator() -> None:
    group, alone = run_alongside("nashmtl", updates=2)
    obs = torch.randn(len(SEEDS), TASKS, OBS, generator=torch.Generator().manual_seed(7))
    for deterministic in (True, False, False):
        actions = group.act(obs, deterministic)
        assert actions.shape == (len(SEEDS), TASKS, ACTIONS)
        for index, agent in enumerate(alone):
            torch.testing.assert_close(
                actions[index], agent.act(obs[index], deterministic), rtol=1e-5, atol=1e-6
            )
        for grouped, single in zip(group.agents, alone):
            assert torch.equal(grouped.generator.get_state(), single.generator.get_state())
    assert not torch.allclose(actions[0], actions[1])


@pytest.mark.parametrize("name", ["ntkmtl", "famo", "moco", "graddrop"])
def test_a_grouped_agents_state_dict_continues_in_a_single_agent(name: str) -> None:
    group, _ = run_alongside(name, updates=3)
    restored = []
    for index, grouped in enumerate(group.agents):
        single = make_agent(name, 50 + index)  # other initial weights, overwritten
        single.load_state_dict(grouped.state_dict())
        restored.append(single)
    for step in range(3, 5):
        batches = [make_batch(step, seed) for seed in SEEDS]
        group.update(batches)
        for single, batch in zip(restored, batches):
            single.update(batch)
    for grouped, single in zip(group.agents, restored):
        assert_same_agent_state(grouped, single, loose=name == "famo")


@pytest.mark.parametrize("name", ["ntkmtl", "famo", "moco", "uw", "dwa", "nashmtl"])
def test_load_state_dict_into_a_grouped_agent_writes_into_the_group(name: str) -> None:
    group = make_group(name)
    group.update([make_batch(0, seed) for seed in SEEDS])
    donor = make_agent(name, 7)
    for step in range(3):
        donor.update(make_batch(step, 7))
    group.agents[1].load_state_dict(donor.state_dict())
    seed_two = make_agent(name, 2)
    seed_two.update(make_batch(0, 2))
    group.update([make_batch(1, 0), make_batch(3, 7), make_batch(1, 2)])
    donor.update(make_batch(3, 7))
    seed_two.update(make_batch(1, 2))
    assert_same_agent_state(group.agents[1], donor, loose=name == "famo")
    assert_same_agent_state(group.agents[2], seed_two, loose=name == "famo")


# Nash-MTL's compile (40 unrolled Newton steps, ~30 s) is left to test_captured_update.py,
# which compiles every combiner; here the vmapped update is what is new.
@pytest.mark.parametrize("name", ["ntkmtl", "pcgrad", "famo"])
def test_compiled_group_is_one_graph_and_makes_the_eager_groups_updates(name: str) -> None:
    eager, compiled = make_group(name), make_group(name, compile=True,
                                                   compile_backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for step in range(4):
            batches = [make_batch(step, seed) for seed in SEEDS]
            expected, got = eager.update(batches), compiled.update(batches)
            assert_same_state(got, expected, f"metrics {step}")
    assert compiled._update_fn.compiled
    for got_agent, expected_agent in zip(compiled.agents, eager.agents):
        assert_same_agent_state(got_agent, expected_agent, loose=name == "famo")


def test_compiled_group_policy_acts_as_the_eager_one() -> None:
    eager, compiled = make_group("ls"), make_group("ls", compile=True, compile_backend="aot_eager")
    obs = torch.randn(len(SEEDS), TASKS, OBS, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for deterministic in (True, False, False, True):
            torch.testing.assert_close(
                compiled.act(obs, deterministic), eager.act(obs, deterministic)
            )
    assert compiled._act_fn.compiled


def stacked_inputs(group: SeedGroupSAC, step: int) -> tuple[torch.Tensor | None, ...]:
    """The arguments of ``group.update_graph`` for one update: the batches, the policy noise
    and the combiners' random numbers, stacked over seeds (drawn outside the count)."""
    batches = [make_batch(step, seed) for seed in range(group.num_seeds)]
    fields = tuple(
        torch.stack([getattr(batch, field) for batch in batches])
        for field in ("obs", "action", "reward", "next_obs", "done")
    )
    noise = torch.randn(group.num_seeds, 2, TASKS, PER_TASK, ACTIONS)
    draws = []
    for role in ("critic", "actor"):
        drawn = [
            getattr(agent, f"{role}_combiner").draw_random(
                getattr(agent, f"{role}_engine").shared_dim, agent.device
            )
            for agent in group.agents
        ]
        draws.append(None if drawn[0] is None else torch.stack(drawn))
    return (*fields, noise, *draws)


@pytest.mark.parametrize("arch", ["mtsac", "task_encoder"])
@pytest.mark.parametrize("name", ["ls", "ntkmtl", "nashmtl", "famo", "graddrop"])
def test_the_ops_of_a_group_update_do_not_grow_with_the_seeds(name: str, arch: str) -> None:
    """What is counted: the ATen ops of the vmapped ``update_graph`` of the whole group, from
    pre-drawn inputs (``update`` adds its per-seed draws: 2 to 4 small ops per seed).

    A per-seed fallback of vmap adds at least one op per seed for every op that falls
    back. One change with S that is not one: from S = 2 on, ``F.embedding``'s batching
    rule copies the stacked task-embedding table (``task_encoder``) where at S = 1 a view
    of it does, so there S = 1 may differ from S = 2 in copies instead of views only.
    """
    ops = {}
    for seeds in (1, 2, 4):
        group = make_group(name, tuple(range(seeds)), config(arch))
        group.update([make_batch(0, seed) for seed in range(seeds)])  # lazy allocations
        inputs = stacked_inputs(group, 1)
        with foreach.seed_axis():
            _, counter = count_ops(group.update_graph, *inputs)
        assert counter.syncs == 0, dict(counter.sync_names)
        ops[seeds] = counter.by_name
    assert ops[1].total() > 1000 and ops[2] == ops[4], (ops[2] - ops[4]) + (ops[4] - ops[2])
    copies = {"aten.clone", "aten._unsafe_view", "aten.view"}
    changed = {op for op in ops[1].keys() | ops[2].keys() if ops[1][op] != ops[2][op]}
    assert changed <= (copies if arch == "task_encoder" else set()), changed


def test_the_op_count_sees_a_per_seed_fallback_of_vmap() -> None:
    """The count above fails when vmap loops over seeds (addcmul_ has no batching rule)."""

    def update(state: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return state.clone().addcmul_(grad, grad, value=0.5)

    totals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for seeds in (1, 4):
            _, counter = count_ops(torch.func.vmap(update), torch.ones(seeds, 3),
                                   torch.ones(seeds, 3))
            totals.append(counter.total)
    assert totals[1] > totals[0]


def test_tensor_sites_rebind_attributes_dict_items_and_list_items() -> None:
    state = torch.zeros(2)
    other = torch.ones(2)
    holder = types.SimpleNamespace(direct=state, by_name={"a": state}, in_list=[other, state])
    sites = TensorSites(holder, [state])
    assert len(sites.sites) == 3
    replacement = torch.full((2,), 5.0)
    sites.bind([replacement])
    assert holder.direct is replacement and holder.by_name["a"] is replacement
    assert holder.in_list[0] is other and holder.in_list[1] is replacement
    assert sites.current()[0] is replacement


def test_tensor_sites_reject_a_tensor_held_in_a_tuple() -> None:
    state = torch.zeros(2)
    with pytest.raises(TypeError, match="held in a tuple"):
        TensorSites(types.SimpleNamespace(pair=(state, 1)), [state])


def test_tensor_sites_reject_a_tensor_referenced_nowhere() -> None:
    state, elsewhere = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match=r"state tensors \[1\] are not referenced"):
        TensorSites(types.SimpleNamespace(kept=state), [state, elsewhere])


def test_a_group_needs_agents() -> None:
    with pytest.raises(ValueError, match="at least one agent"):
        SeedGroupSAC([])


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden_dim": 16}, "hidden_dim: 16 vs 8"),
    ({"gamma": 0.5}, "gamma: 0.5 vs 0.99"),  # same shapes: vmap would use agent 0's gamma
])
def test_agents_of_different_configs_cannot_form_a_group(changes: dict, message: str) -> None:
    agents = [make_agent("ls", 0), make_agent("ls", 1, config(**changes))]
    with pytest.raises(ValueError, match=f"agent 1 .* has other settings .*{message}"):
        SeedGroupSAC(agents)


def test_agents_of_different_combiner_settings_cannot_form_a_group() -> None:
    def agent(exponent: float) -> MultiTaskSAC:
        return MultiTaskSAC(
            OBS, ACTIONS, TASKS, config(), make_combiner("ntkmtl", TASKS, exponent=exponent),
            make_combiner("ntkmtl", TASKS), "cpu",
        )

    with pytest.raises(ValueError, match=r"critic combiner: NTKMTL\(exponent=1.0"):
        SeedGroupSAC([agent(0.5), agent(1.0)])


def test_agents_of_different_shapes_cannot_form_a_group() -> None:
    other = MultiTaskSAC(OBS + 1, ACTIONS, TASKS, config(), make_combiner("ls", TASKS),
                         make_combiner("ls", TASKS), "cpu")
    with pytest.raises(ValueError, match="agent 1 of the seed group does not have agent 0's"):
        SeedGroupSAC([make_agent("ls", 0), other])


def test_update_and_act_need_one_input_per_seed() -> None:
    group = make_group("ls")
    with pytest.raises(ValueError, match="2 batches for a group of 3 seeds"):
        group.update([make_batch(0, 0), make_batch(0, 1)])
    with pytest.raises(ValueError, match="4 observations for a group of 3 seeds"):
        group.act(torch.zeros(4, TASKS, OBS), deterministic=True)
