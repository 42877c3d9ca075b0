"""Properties every combiner must have, on seeded gradient matrices (TorchJD-style asserts)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor

from mtrl_ntk.combiners import (
    Need,
    available_combiners,
    combine,
    direction_from_output,
    make_combiner,
    stats_from_gradients,
)
from tests.combiners.samplers import log_spaced_norms, sample_task_gradients

# Methods whose output depends on the order in which the tasks are listed even
# for the same random draws: their permutation equivariance holds only in
# distribution, which a unit test cannot check exactly.
ORDER_DEPENDENT_RANDOM = {
    "rlw": "the weight vector is drawn independently of which task sits in which row",
    "pcgrad": "projects onto the other tasks in a random order drawn per task row",
}


def positive_losses(tasks: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.rand(tasks, generator=generator, dtype=torch.float64)


def seeded_combine(name: str, grads: Tensor, losses: Tensor) -> Tensor:
    # Random methods seed their own generator from torch's global RNG when built.
    torch.manual_seed(1234)
    return combine(name, grads, losses=losses)


def assert_positive_multiple(direction: Tensor, gradient: Tensor) -> None:
    """direction = c · gradient with c > 0."""
    cosine = direction @ gradient / (direction.norm() * gradient.norm())
    assert cosine > 1 - 1e-9


@pytest.mark.parametrize("name", available_combiners())
def test_output_is_finite_when_one_task_gradient_is_zero(name: str) -> None:
    grads = sample_task_gradients(tasks=4, dim=50, seed=0)
    grads[2] = 0.0
    direction = seeded_combine(name, grads, positive_losses(4, seed=0))
    assert direction.shape == (50,)
    assert torch.isfinite(direction).all()


@pytest.mark.parametrize("name", available_combiners())
def test_identical_tasks_give_a_positive_multiple_of_their_gradient(name: str) -> None:
    gradient = sample_task_gradients(tasks=1, dim=30, seed=1)[0]
    grads = gradient.repeat(4, 1)  # [4, 30]
    direction = seeded_combine(name, grads, torch.ones(4, dtype=torch.float64))
    assert torch.isfinite(direction).all()
    assert_positive_multiple(direction, gradient)


@pytest.mark.parametrize("name", available_combiners())
def test_one_task_gives_a_positive_multiple_of_its_gradient(name: str) -> None:
    grads = sample_task_gradients(tasks=1, dim=30, seed=2)
    direction = seeded_combine(name, grads, torch.tensor([0.7], dtype=torch.float64))
    assert torch.isfinite(direction).all()
    assert_positive_multiple(direction, grads[0])


@pytest.mark.parametrize("name", available_combiners())
def test_output_is_finite_for_norm_ratios_of_1e8(name: str) -> None:
    norms = log_spaced_norms(5, 1e-4, 1e4)
    grads = sample_task_gradients(tasks=5, dim=40, seed=3, norms=norms)
    direction = seeded_combine(name, grads, positive_losses(5, seed=3))
    assert torch.isfinite(direction).all()
    assert direction.norm() > 0


@pytest.mark.parametrize("name", available_combiners())
def test_output_is_finite_with_more_tasks_than_dimensions(name: str) -> None:
    grads = sample_task_gradients(tasks=12, dim=5, seed=4)
    direction = seeded_combine(name, grads, positive_losses(12, seed=4))
    assert direction.shape == (5,)
    assert torch.isfinite(direction).all()


@pytest.mark.parametrize("name", available_combiners())
def test_direction_does_not_depend_on_the_order_of_the_tasks(name: str) -> None:
    if name in ORDER_DEPENDENT_RANDOM:
        pytest.skip(f"{name}: {ORDER_DEPENDENT_RANDOM[name]}")
    grads = sample_task_gradients(tasks=5, dim=30, seed=5)
    losses = positive_losses(5, seed=5)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    direction = seeded_combine(name, grads, losses)
    permuted = seeded_combine(name, grads[permutation], losses[permutation])
    torch.testing.assert_close(permuted, direction, rtol=1e-6, atol=1e-9 * direction.norm())


@pytest.mark.parametrize("name", available_combiners())
def test_weights_follow_a_permutation_of_the_tasks(name: str) -> None:
    if name in ORDER_DEPENDENT_RANDOM:
        pytest.skip(f"{name}: {ORDER_DEPENDENT_RANDOM[name]}")
    grads = sample_task_gradients(tasks=5, dim=30, seed=6)
    losses = positive_losses(5, seed=6)
    permutation = torch.tensor([2, 4, 0, 3, 1])
    outputs = []
    for rows in (torch.arange(5), permutation):
        torch.manual_seed(99)
        combiner = make_combiner(name, num_tasks=5)
        stats = stats_from_gradients(grads[rows], combiner.need, losses[rows])
        outputs.append(combiner.combine(stats))
    # Direction methods report the weights of what they combine (MoCo's λ) as a diagnostic.
    weights = [out.diagnostics.get("weights") if out.weights is None else out.weights
               for out in outputs]
    if weights[0] is None:
        pytest.skip(f"{name} reports no task weights; its direction is checked above")
    torch.testing.assert_close(weights[1], weights[0][permutation], rtol=1e-6, atol=1e-12)


def _run_steps(combiner, steps: range, num_tasks: int, dim: int) -> list[Tensor]:
    """Feed ``combiner`` one seeded update per step (with losses after the step where needed)."""
    directions = []
    for step in steps:
        grads = sample_task_gradients(tasks=num_tasks, dim=dim, seed=100 + step)
        losses = positive_losses(num_tasks, seed=100 + step)
        stats = stats_from_gradients(grads, combiner.need, losses)
        output = combiner.combine(stats)
        directions.append(direction_from_output(output, stats.task_gradients))
        if Need.LOSSES_AFTER_STEP in combiner.need:
            combiner.update_after_step(losses * 0.9 ** torch.arange(1, num_tasks + 1))
    return directions


@pytest.mark.parametrize("name", available_combiners())
def test_state_dict_restores_the_next_outputs_exactly(name: str) -> None:
    num_tasks, dim = 4, 25
    torch.manual_seed(7)
    original = make_combiner(name, num_tasks=num_tasks)
    _run_steps(original, range(3), num_tasks, dim)

    # Through a checkpoint file (torch.load's default weights_only=True), and
    # before the original moves on: a state that aliases live tensors would change.
    state = original.state_dict()
    expected = _run_steps(original, range(3, 6), num_tasks, dim)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    torch.manual_seed(8)  # a different seed: everything must come from the state
    restored = make_combiner(name, num_tasks=num_tasks)
    restored.load_state_dict(torch.load(buffer))
    restored_directions = _run_steps(restored, range(3, 6), num_tasks, dim)
    for got, want in zip(restored_directions, expected, strict=True):
        assert torch.equal(got, want)
