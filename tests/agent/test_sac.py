"""Multi-task SAC: the losses against a hand computation, grouping, targets, checkpoints."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from mtrl_ntk.agent import ARCHITECTURES, AgentConfig, MultiTaskSAC
from mtrl_ntk.agent.models import TaskMLP
from mtrl_ntk.combiners import available_combiners, make_combiner
from mtrl_ntk.replay import Batch
from tests.agent.batches import random_batch

TASKS, PER_TASK, OBS, ACTIONS = 2, 3, 3, 2
TINY = {"hidden_dim": 8, "num_layers": 1, "task_embedding_dim": 4}


def make_batch(tasks: int = TASKS, per_task: int = PER_TASK, seed: int = 0) -> Batch:
    done = (torch.arange(tasks * per_task) % 2).float().view(tasks, per_task)
    return random_batch(tasks, per_task, OBS, ACTIONS, seed, done=done)


def make_agent(
    combiner: str = "ls", tasks: int = TASKS, actor_combiner: str | None = None, seed: int = 0,
    **settings,
) -> MultiTaskSAC:
    cfg = AgentConfig(**{**TINY, **settings})
    torch.manual_seed(seed)
    return MultiTaskSAC(
        OBS, ACTIONS, tasks, cfg, make_combiner(combiner, tasks),
        make_combiner(actor_combiner or combiner, tasks), "cpu", seed=seed,
    )


def set_weights(module: nn.Module, seed: int) -> None:
    """Deterministic weights, uniform in [-0.5, 0.5], in parameter order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.rand(param.shape, generator=generator) - 0.5)


def peek_noise(agent: MultiTaskSAC, tasks: int = TASKS, per_task: int = PER_TASK) -> Tensor:
    """The noise the next update will draw: [2, T, B_t, A] (next-state sample, actor sample)."""
    generator = torch.Generator()
    generator.set_state(agent.generator.get_state())
    return torch.randn((2, tasks, per_task, ACTIONS), generator=generator)


# -- an independent implementation of the mtsac networks and the SAC losses, plain ops ------


def mlp_by_hand(inputs: Tensor, mlp: TaskMLP) -> Tensor:
    layers = [(layer.weight, layer.bias) for layer in mlp.hidden]
    for weight, bias in layers:
        inputs = torch.relu(inputs @ weight.T + bias)
    return inputs @ mlp.output.weight.T + mlp.output.bias


def one_hot(tasks: int, per_task: int) -> Tensor:
    return torch.eye(tasks).repeat_interleave(per_task, dim=0).view(tasks, per_task, tasks)


def policy_by_hand(
    actor: nn.Module, cfg: AgentConfig, obs: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    tasks, per_task = obs.shape[:2]
    out = mlp_by_hand(torch.cat([obs, one_hot(tasks, per_task)], -1), actor.mlp)
    mean, raw = out[..., :ACTIONS], out[..., ACTIONS:]
    low, high = cfg.log_std_min, cfg.log_std_max
    std = torch.exp(low + (high - low) * (torch.tanh(raw) + 1) / 2)
    pre_tanh = mean + std * noise
    action = torch.tanh(pre_tanh)
    log_prob = Normal(mean, std).log_prob(pre_tanh).sum(-1) - torch.log(1 - action**2).sum(-1)
    return action, log_prob  # [T, B_t, A], [T, B_t]


def q_by_hand(critic: nn.Module, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
    tasks, per_task = obs.shape[:2]
    inputs = torch.cat([obs, action, one_hot(tasks, per_task)], -1)
    return mlp_by_hand(inputs, critic.q1).squeeze(-1), mlp_by_hand(inputs, critic.q2).squeeze(-1)


def test_update_matches_a_hand_computation_of_the_sac_losses_and_targets() -> None:
    agent = make_agent(arch="mtsac", disentangled_alpha=True, gamma=0.9, tau=0.1,
                       log_std_min=-5.0)
    for seed, module in enumerate((agent.actor, agent.critic, agent.critic_target)):
        set_weights(module, seed)
    alpha = torch.tensor([0.5, 2.0])  # a different temperature per task
    with torch.no_grad():
        agent.log_alpha.copy_(alpha.log())
    batch = make_batch()
    next_noise, noise = peek_noise(agent)
    actor_before = copy.deepcopy(agent.actor)
    critic_before = copy.deepcopy(agent.critic)
    target_before = copy.deepcopy(agent.critic_target)

    metrics = agent.update(batch)

    with torch.no_grad():
        next_action, next_log_prob = policy_by_hand(
            actor_before, agent.cfg, batch.next_obs, next_noise
        )
        next_q1, next_q2 = q_by_hand(target_before, batch.next_obs, next_action)
        soft_value = torch.minimum(next_q1, next_q2) - alpha[:, None] * next_log_prob
        target = batch.reward + 0.9 * (1 - batch.done) * soft_value  # [T, B_t]
        q1, q2 = q_by_hand(critic_before, batch.obs, batch.action)
        critic_losses = ((q1 - target) ** 2 + (q2 - target) ** 2).mean(dim=1)  # [T]

        action, log_prob = policy_by_hand(actor_before, agent.cfg, batch.obs, noise)
        new_q1, new_q2 = q_by_hand(agent.critic, batch.obs, action)  # the updated critic
        actor_losses = (alpha[:, None] * log_prob - torch.minimum(new_q1, new_q2)).mean(dim=1)
        alpha_loss = (alpha[:, None] * (-log_prob + ACTIONS)).mean()

    torch.testing.assert_close(metrics["critic_task_losses"], critic_losses)
    torch.testing.assert_close(metrics["critic_loss"], critic_losses.mean())
    torch.testing.assert_close(metrics["actor_task_losses"], actor_losses)
    torch.testing.assert_close(metrics["alpha_loss"], alpha_loss)
    torch.testing.assert_close(metrics["entropy"], -log_prob.mean())
    torch.testing.assert_close(metrics["task_entropy"], -log_prob.mean(dim=1))
    torch.testing.assert_close(metrics["critic_weights"].float(), torch.full((TASKS,), 0.5))
    assert bool(metrics["finite"])
    # The critic target after the update: Polyak average of the old target and the new critic.
    for old, new, online in zip(target_before.parameters(), agent.critic_target.parameters(),
                                agent.critic.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


@pytest.mark.parametrize(
    ("arch", "head_layers"),
    [(a, 1) for a in ARCHITECTURES if a != "independent"] + [("multihead", 2)],
)
def test_engine_per_task_gradients_are_each_tasks_own_loss_gradient(
    arch: str, head_layers: int
) -> None:
    agent = make_agent("ntkmtl", arch=arch, num_layers=2, head_layers=head_layers)
    if head_layers > 1:  # mtrl's multi-head: the heads' hidden layers are task-specific too
        names = [n for n, _ in agent.critic.named_parameters() if "head_hidden" in n]
        assert names and all(agent.critic.is_task_specific(n) for n in names)
    batch = make_batch(per_task=4)
    next_noise, _ = peek_noise(agent, per_task=4)
    task_ids = torch.arange(TASKS)[:, None].expand(TASKS, 4)
    target = agent.td_target(batch.reward, batch.next_obs, batch.done, task_ids, next_noise,
                             agent.task_encoding(task_ids))
    critic = copy.deepcopy(agent.critic)
    shared = [(n, p) for n, p in critic.named_parameters() if not critic.is_task_specific(n)]
    rows, losses = [], []
    for task in range(TASKS):  # one task at a time, plain autograd, no vmap
        task_batch = {"obs": batch.obs[task], "action": batch.action[task],
                      "task_ids": task_ids[task], "target_q": target[task]}
        per_sample, _ = agent.critic_loss(dict(critic.named_parameters()), task_batch)
        loss = per_sample.mean()
        grads = torch.autograd.grad(loss, [p for _, p in shared])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
        losses.append(loss.detach())
    task_gradients = torch.stack(rows).double()  # [T, d]

    metrics = agent.update(batch)
    torch.testing.assert_close(metrics["critic_task_losses"], torch.stack(losses))
    torch.testing.assert_close(
        metrics["critic_gramian"], task_gradients @ task_gradients.T, rtol=1e-4, atol=1e-6
    )
    eigenvalues = metrics["critic_ntk_eigenvalues"]  # one mini-batch: λ_i = ‖g_i‖²
    torch.testing.assert_close(eigenvalues, task_gradients.square().sum(1), rtol=1e-4, atol=1e-6)


def test_independent_agent_matches_single_task_agents() -> None:
    """The STL baseline: task i's networks after an update depend on task i's data only."""
    agent = make_agent(arch="independent")
    batch = make_batch()
    changed = make_batch(seed=7)  # task 1's data replaced, task 0's kept
    mixed = Batch(**{f: torch.stack([getattr(batch, f)[0], getattr(changed, f)[1]])
                     for f in ("obs", "action", "reward", "next_obs", "done")})
    twin = copy.deepcopy(agent)
    agent.update(batch)
    twin.update(mixed)
    for module in ("critic", "actor"):
        pairs = list(zip(getattr(agent, module).parameters(), getattr(twin, module).parameters()))
        for param, twin_param in pairs:
            assert torch.equal(param[0], twin_param[0]), module
        # Task 1's networks saw other data (Adam's first step is ±lr, so compare them all).
        assert any(not torch.equal(param[1], twin_param[1]) for param, twin_param in pairs)


def test_polyak_update_is_exact() -> None:
    agent = make_agent(tau=0.25)
    set_weights(agent.critic, 1)
    set_weights(agent.critic_target, 2)
    before = [p.clone() for p in agent.critic_target.parameters()]
    agent.update_target()
    for old, new, online in zip(before, agent.critic_target.parameters(),
                                agent.critic.parameters()):
        torch.testing.assert_close(new, old + 0.25 * (online - old), rtol=0, atol=1e-7)
    whole = make_agent(tau=1.0)
    whole.update_target()
    for target, online in zip(whole.critic_target.parameters(), whole.critic.parameters()):
        assert torch.equal(target, online)


def test_state_dict_round_trip_gives_an_identical_next_update() -> None:
    stateful = "famo" if "famo" in available_combiners() else "ls"
    agent = make_agent("ntkmtl", actor_combiner=stateful, disentangled_alpha=True)
    for seed in range(2):  # so that optimiser and combiner states are not trivial
        agent.update(make_batch(seed=seed))
    saved = io.BytesIO()
    torch.save(agent.state_dict(), saved)
    saved.seek(0)
    restored = make_agent("ntkmtl", actor_combiner=stateful, disentangled_alpha=True, seed=5)
    restored.load_state_dict(torch.load(saved, weights_only=True))

    batch = make_batch(seed=3)
    expected, got = agent.update(batch), restored.update(batch)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    for module in ("actor", "critic", "critic_target"):
        pairs = zip(getattr(agent, module).parameters(), getattr(restored, module).parameters())
        for a, b in pairs:
            assert torch.equal(a, b), module
    assert torch.equal(agent.log_alpha, restored.log_alpha)
    assert torch.equal(agent.act(batch.obs[:, 0], False), restored.act(batch.obs[:, 0], False))


@pytest.mark.parametrize("name", ["ntkmtl", "nashmtl"])
def test_a_balanced_update_changes_every_network_and_reports_finite_metrics(name: str) -> None:
    if name not in available_combiners():
        pytest.skip(f"combiner {name!r} is not registered yet")
    agent = make_agent(name, tasks=3)
    before = {module: [p.clone() for p in getattr(agent, module).parameters()]
              for module in ("actor", "critic", "critic_target")}
    alpha_before = agent.log_alpha.clone()
    metrics = agent.update(make_batch(tasks=3, per_task=4))
    for module, params in before.items():
        after = list(getattr(agent, module).parameters())
        assert any(not torch.equal(a, b) for a, b in zip(params, after)), module
    assert not torch.equal(alpha_before, agent.log_alpha)
    assert bool(metrics["finite"])
    for key, value in metrics.items():
        assert torch.isfinite(value.double()).all(), key
    assert metrics["critic_weights"].shape == metrics["actor_weights"].shape == (3,)
    assert metrics["critic_gramian"].shape == (3, 3)
    if name == "ntkmtl":
        assert metrics["critic_ntk_eigenvalues"].shape == (3,)


def test_losses_not_listed_in_balance_are_averaged_over_tasks() -> None:
    agent = make_agent("ntkmtl", tasks=3, balance=["critic"])
    assert agent.cfg.balance == ("critic",)
    metrics = agent.update(make_batch(tasks=3))
    torch.testing.assert_close(metrics["actor_weights"].double(), torch.full((3,), 1 / 3).double())
    assert "critic_ntk_eigenvalues" in metrics and "actor_ntk_eigenvalues" not in metrics
    plain = make_agent("ntkmtl", tasks=3, balance=())
    assert plain.critic_combiner.name == plain.actor_combiner.name == "ls"


def test_each_tasks_temperature_moves_towards_the_target_entropy() -> None:
    agent = make_agent(disentangled_alpha=True, tasks=3)
    before = agent.log_alpha.detach().clone()
    metrics = agent.update(make_batch(tasks=3))
    assert metrics["alpha"].shape == (3,)
    step = agent.log_alpha.detach() - before
    # ∂L/∂log α_i ∝ α_i (H_i - H̄): above the target entropy the temperature drops.
    excess_entropy = metrics["task_entropy"] - agent.target_entropy
    assert torch.equal(torch.sign(step), -torch.sign(excess_entropy))
    shared = make_agent(tasks=3)
    assert shared.update(make_batch(tasks=3))["alpha"].shape == ()


def test_act_returns_the_mean_action_or_a_sample_per_task() -> None:
    agent = make_agent(tasks=3)
    obs = torch.randn(3, OBS)
    deterministic = agent.act(obs, deterministic=True)
    mean, _, _ = agent.actor(obs, torch.arange(3), agent.task_encoding(torch.arange(3)))
    assert deterministic.shape == (3, ACTIONS)
    torch.testing.assert_close(deterministic, torch.tanh(mean).detach())
    first, second = agent.act(obs, deterministic=False), agent.act(obs, deterministic=False)
    assert not torch.equal(first, second)
    assert torch.all(first.abs() <= 1)


def test_invalid_settings_fail_with_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ValueError,
                       match="arch.*mtsac, obs_only, task_encoder, multihead, independent"):
        AgentConfig(arch="transformer")
    with pytest.raises(ValueError, match="balance"):
        AgentConfig(balance=("critic", "temperature"))
    with pytest.raises(ValueError, match="balance"):
        AgentConfig(balance=("critic", "critic"))
    with pytest.raises(ValueError, match="tau"):
        AgentConfig(tau=0.0)
    with pytest.raises(ValueError, match="log_std_max"):
        AgentConfig(log_std_min=2.0, log_std_max=-20.0)
    with pytest.raises(ValueError, match="built for 4 tasks"):
        MultiTaskSAC(OBS, ACTIONS, 3, AgentConfig(**TINY), make_combiner("ls", 4),
                     make_combiner("ls", 3), "cpu")
    assert math.isclose(AgentConfig().init_temperature, 1.0)


# -- the task encoder with mtrl's semantics ------------------------------------------------------

EMBEDDING = "task_encoder.embedding.weight"


def encoder_params(agent: MultiTaskSAC) -> dict[str, Tensor]:
    return {n: p for n, p in agent.critic.named_parameters() if n.startswith("task_encoder.")}


def actor_batch(agent: MultiTaskSAC, batch: Batch) -> dict[str, Tensor]:
    task_ids = torch.arange(TASKS)[:, None].expand(TASKS, PER_TASK)
    flat = lambda t: t.reshape(TASKS * PER_TASK, *t.shape[2:])  # noqa: E731
    return {"obs": flat(batch.obs), "task_ids": flat(task_ids),
            "noise": torch.randn(TASKS * PER_TASK, ACTIONS),
            "alpha": torch.ones(TASKS * PER_TASK),
            "task_encoding": flat(agent.task_encoding(task_ids))}


def test_the_actor_loss_leaves_the_task_encoders_gradient_at_zero() -> None:
    agent = make_agent(arch="task_encoder")
    assert not any("encoder" in name for name, _ in agent.actor.named_parameters())
    # Even with the critic's parameters NOT detached, the actor loss cannot reach the
    # encoder: actor and critic read the detached encoding.
    critic_params = dict(agent.critic.named_parameters())
    losses, _ = agent.actor_loss(critic_params, dict(agent.actor.named_parameters()),
                                 actor_batch(agent, make_batch()))
    names = list(encoder_params(agent))
    grads = torch.autograd.grad(losses.mean(), [critic_params[n] for n in names],
                                allow_unused=True)
    assert all(grad is None or torch.all(grad == 0) for grad in grads)
    # ... while the critic's own weights do get a gradient from it (the graph is live).
    (head_grad,) = torch.autograd.grad(losses.mean(), [critic_params["q1.output.weight"]])
    assert head_grad.abs().sum() > 0


def test_the_critic_loss_trains_the_task_encoder() -> None:
    agent = make_agent(arch="task_encoder")
    before = {n: p.detach().clone() for n, p in encoder_params(agent).items()}
    agent.update(make_batch())
    for name, param in encoder_params(agent).items():
        assert not torch.equal(param, before[name]), name  # every part of the encoder moved
    # Only the critic's optimiser holds the encoder; the actor's holds none of it.
    actor_ids = {id(p) for p in agent.actor.parameters()}
    assert not any(id(p) in actor_ids for p in encoder_params(agent).values())


def test_the_engine_keeps_the_task_embedding_out_of_the_gramian() -> None:
    agent = make_agent("ntkmtl", arch="task_encoder")
    engine = agent.critic_engine
    assert EMBEDDING in engine.specific_names and EMBEDDING not in engine.shared_names
    shared = [n for n, _ in agent.critic.named_parameters() if n != EMBEDDING]
    assert engine.shared_names == shared
    assert engine.shared_dim == sum(dict(agent.critic.named_parameters())[n].numel()
                                    for n in shared)
    # The encoder's MLP is shared: it is in the Jacobian the Gramian is formed from.
    assert any(n.startswith("task_encoder.") for n in engine.shared_names)
    # The embedding still gets each task's own gradient (row i from task i only).
    before = agent.critic.task_encoder.embedding.weight.detach().clone()
    agent.update(make_batch())
    assert torch.all((agent.critic.task_encoder.embedding.weight != before).any(dim=1))


def test_independent_learns_one_temperature_per_task_unless_told_otherwise() -> None:
    assert AgentConfig(arch="independent").disentangled_alpha is True
    assert AgentConfig(arch="independent", disentangled_alpha=False).disentangled_alpha is False
    assert AgentConfig(arch="mtsac").disentangled_alpha is False
    assert make_agent(arch="independent").log_alpha.shape == (TASKS,)
