"""Networks of the agent: architectures, task independence, vmap, the tanh-Gaussian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Normal, TanhTransform, TransformedDistribution
from torch.func import functional_call, vmap

from mtrl_ntk.agent.models import (
    ARCHITECTURES,
    Actor,
    StackedLinear,
    TwinCritic,
    squash_log_std,
    tanh_gaussian_sample,
)

TASKS, PER_TASK, OBS, ACTIONS, HIDDEN = 3, 4, 5, 2, 8


def make_nets(arch: str, seed: int = 0) -> tuple[Actor, TwinCritic]:
    torch.manual_seed(seed)
    actor = Actor(OBS, ACTIONS, TASKS, arch=arch, hidden_dim=HIDDEN, num_layers=2,
                  task_embedding_dim=6)
    critic = TwinCritic(OBS, ACTIONS, TASKS, arch=arch, hidden_dim=HIDDEN, num_layers=2,
                        task_embedding_dim=6)
    return actor, critic


def encoding_of(critic: TwinCritic, task_ids: Tensor) -> Tensor | None:
    """What the agent feeds the actor: the critic's task encoding, detached (or None)."""
    encoding = critic.encode(task_ids)
    return None if encoding is None else encoding.detach()


def grouped_inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """obs [T, B_t, D], action [T, B_t, A], task_ids [T, B_t] (row i is task i)."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(TASKS, PER_TASK, OBS, generator=generator)
    action = torch.rand(TASKS, PER_TASK, ACTIONS, generator=generator) * 2 - 1
    task_ids = torch.arange(TASKS).unsqueeze(1).expand(TASKS, PER_TASK)
    return obs, action, task_ids


def flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(TASKS * PER_TASK, *tensor.shape[2:])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_batch_and_vmapped_task_slices_give_the_same_outputs(arch: str) -> None:
    actor, critic = make_nets(arch)
    obs, action, task_ids = grouped_inputs()

    encoding = encoding_of(critic, task_ids)  # [T, B_t, E] or None
    flat_encoding = None if encoding is None else flat(encoding)
    mean, log_std, actor_z = actor(flat(obs), flat(task_ids), flat_encoding)
    q1, q2, critic_z = critic(flat(obs), flat(action), flat(task_ids))
    assert mean.shape == log_std.shape == (TASKS * PER_TASK, ACTIONS)
    assert actor_z.shape == (TASKS * PER_TASK, HIDDEN)
    assert q1.shape == q2.shape == (TASKS * PER_TASK,)
    assert critic_z.shape == (TASKS * PER_TASK, 2 * HIDDEN)

    # The engine's path: functional_call under vmap over the task axis, params unbatched.
    actor_params = dict(actor.named_parameters())
    critic_params = dict(critic.named_parameters())
    sliced_actor = vmap(
        lambda o, t, e: functional_call(actor, actor_params, (o, t, e)),
        in_dims=(0, 0, None if encoding is None else 0),
    )(obs, task_ids, encoding)
    sliced_critic = vmap(lambda o, a, t: functional_call(critic, critic_params, (o, a, t)))(
        obs, action, task_ids
    )
    for full, sliced in zip((mean, log_std, actor_z), sliced_actor):
        torch.testing.assert_close(sliced, full.view(TASKS, PER_TASK, -1))
    for full, sliced in zip((q1, q2, critic_z), sliced_critic):
        torch.testing.assert_close(sliced, full.view(TASKS, PER_TASK, *full.shape[1:]))


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch != "obs_only"])
def test_every_architecture_but_obs_only_conditions_on_the_task(arch: str) -> None:
    actor, critic = make_nets(arch)
    obs = torch.randn(1, OBS).expand(TASKS, OBS)  # the same observation for every task
    task_ids = torch.arange(TASKS)
    mean, _, _ = actor(obs, task_ids, encoding_of(critic, task_ids))
    q1, _, _ = critic(obs, torch.zeros(TASKS, ACTIONS), task_ids)
    assert not torch.allclose(mean[0], mean[1])
    assert not torch.allclose(q1[0], q1[1])


def test_obs_only_networks_read_the_observation_only() -> None:
    actor, critic = make_nets("obs_only")
    obs = torch.randn(1, OBS).expand(TASKS, OBS)
    mean, _, _ = actor(obs, torch.arange(TASKS))
    q1, _, _ = critic(obs, torch.zeros(TASKS, ACTIONS), torch.arange(TASKS))
    torch.testing.assert_close(mean, mean[:1].expand_as(mean))
    torch.testing.assert_close(q1, q1[:1].expand_as(q1))
    assert actor.mlp.hidden[0].weight.shape[1] == OBS  # no task input


def test_task_encoder_actor_needs_the_encoding_and_owns_no_encoder() -> None:
    actor, critic = make_nets("task_encoder")
    assert not any("encoder" in name for name, _ in actor.named_parameters())
    assert critic.task_encoder is not None
    with pytest.raises(ValueError, match="task encoding"):
        actor(torch.randn(TASKS, OBS), torch.arange(TASKS))


def test_task_specific_parameters_per_architecture() -> None:
    expected_specific = {
        "mtsac": set(),
        "obs_only": set(),
        "task_encoder": set(),
        "multihead": {"mlp.output.weight", "mlp.output.bias"},
        "independent": None,  # all of them
    }
    for arch, expected in expected_specific.items():
        actor, critic = make_nets(arch)
        names = [name for name, _ in actor.named_parameters()]
        specific = {name for name in names if actor.is_task_specific(name)}
        assert specific == (set(names) if expected is None else expected), arch
        critic_names = [name for name, _ in critic.named_parameters()]
        critic_specific = {name for name in critic_names if critic.is_task_specific(name)}
        if expected is None:
            assert critic_specific == set(critic_names)
        else:
            head = {name.removeprefix("mlp.") for name in expected}
            embedding = {"task_encoder.embedding.weight"} if arch == "task_encoder" else set()
            assert critic_specific == {f"{q}.{n}" for q in ("q1", "q2") for n in head} | embedding
    # The encoder's MLP is shared by all tasks; only its embedding rows are per task.
    _, critic = make_nets("task_encoder")
    encoder_names = {name for name, _ in critic.named_parameters() if name.startswith("task_")}
    assert {n for n in encoder_names if not critic.is_task_specific(n)} == encoder_names - {
        "task_encoder.embedding.weight"
    }
    assert len(encoder_names) > 1


def per_task_critic_losses(critic: TwinCritic) -> Tensor:
    obs, action, task_ids = grouped_inputs()
    q1, q2, _ = critic(flat(obs), flat(action), flat(task_ids))
    return (q1.square() + q2.square()).view(TASKS, PER_TASK).mean(dim=1)  # [T]


def test_independent_networks_give_a_task_no_gradient_on_another_tasks_parameters() -> None:
    _, critic = make_nets("independent")
    losses = per_task_critic_losses(critic)
    for task in range(TASKS):
        grads = torch.autograd.grad(losses[task], list(critic.parameters()), retain_graph=True)
        for (name, param), grad in zip(critic.named_parameters(), grads):
            assert param.shape[0] == TASKS, name
            others = [t for t in range(TASKS) if t != task]
            assert torch.all(grad[others] == 0), (name, task)
        # The weights of the first layer do receive the task's own gradient.
        first_layer = dict(zip([n for n, _ in critic.named_parameters()], grads))
        assert first_layer["q1.hidden.0.weight"][task].abs().sum() > 0


def test_multihead_heads_get_only_their_own_tasks_gradient_and_the_trunk_gets_all() -> None:
    _, critic = make_nets("multihead")
    losses = per_task_critic_losses(critic)
    for task in range(TASKS):
        named = dict(critic.named_parameters())
        head, trunk = named["q1.output.weight"], named["q1.hidden.0.weight"]
        head_grad, trunk_grad = torch.autograd.grad(losses[task], [head, trunk], retain_graph=True)
        others = [t for t in range(TASKS) if t != task]
        assert torch.all(head_grad[others] == 0)
        assert head_grad[task].abs().sum() > 0
        assert trunk_grad.abs().sum() > 0


def test_stacked_linear_applies_each_tasks_own_layer_on_any_single_task_blocks() -> None:
    torch.manual_seed(0)
    layer = StackedLinear(num_tasks=4, in_features=3, out_features=2)
    with torch.no_grad():
        layer.bias.normal_()

    def reference(inputs: Tensor, task_ids: Tensor) -> Tensor:
        return torch.stack([x @ layer.weight[t] + layer.bias[t] for x, t in zip(inputs, task_ids)])

    cases = [
        torch.arange(4),  # one sample per task (acting)
        torch.arange(4).repeat_interleave(3),  # grouped [T, B_t] flattened
        torch.full((6,), 2),  # one task's slice; gcd(6, 4) = 2 blocks of the same task
        torch.tensor([3, 3, 0, 0, 1, 1, 2, 2]),  # tasks in another order
    ]
    for task_ids in cases:
        inputs = torch.randn(len(task_ids), 3)
        torch.testing.assert_close(layer(inputs, task_ids), reference(inputs, task_ids))


def test_log_std_is_squashed_into_its_bounds_like_mtrl() -> None:
    raw = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    log_std = squash_log_std(raw, -20.0, 2.0)
    assert torch.all(log_std >= -20.0) and torch.all(log_std <= 2.0)
    assert torch.all(log_std[1:] >= log_std[:-1])  # monotone
    torch.testing.assert_close(log_std[[0, 2, 4]], torch.tensor([-20.0, -9.0, 2.0]))


def test_tanh_gaussian_log_prob_matches_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    log_std = torch.rand(64, 3, generator=generator, dtype=torch.float64) * 2 - 1.5
    noise = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    action, log_prob = tanh_gaussian_sample(mean, log_std, noise)
    reference = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    torch.testing.assert_close(action, torch.tanh(mean + log_std.exp() * noise))
    torch.testing.assert_close(log_prob, reference.log_prob(action).sum(-1))


def test_tanh_gaussian_log_prob_stays_exact_where_the_action_saturates() -> None:
    # u = 30: tanh(u) rounds to 1 in float32, yet log(1 - tanh²u) = log 4 - 2u + O(e^-2u).
    mean = torch.tensor([[30.0, -30.0]])
    log_std = torch.tensor([[-2.0, 0.5]])
    noise = torch.zeros(1, 2)
    _, log_prob = tanh_gaussian_sample(mean, log_std, noise)
    gaussian = (-log_std - 0.5 * math.log(2 * math.pi)).sum()
    expected = gaussian - 2 * (math.log(4.0) - 60.0)
    assert torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob, expected.view(1))
