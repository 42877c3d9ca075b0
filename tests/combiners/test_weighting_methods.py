"""Defining properties of FAMO, MoCo, UW, DWA, RLW, GradDrop and SI, checked by hand."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtrl_ntk.combiners import combine, make_combiner, stats_from_gradients
from mtrl_ntk.combiners._tools import adam_step
from mtrl_ntk.combiners.graddrop import sign_dropout
from tests.combiners.samplers import sample_task_gradients


def f64(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def step(combiner, grads: Tensor, losses: Tensor):
    return combiner.combine(stats_from_gradients(grads, combiner.need, losses))


# --- the hand-written Adam step --------------------------------------------------------------


def test_adam_step_matches_torch_adam_with_weight_decay() -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, generator=generator, dtype=torch.float64)
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=0.03, weight_decay=0.01)
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros(5).double(), torch.zeros(5).double()
    for index in range(1, 6):
        grad = torch.randn(5, generator=generator, dtype=torch.float64)
        reference.grad = grad.clone()
        optimizer.step()
        step_count = torch.tensor(float(index), dtype=torch.float64)
        adam_step(param, grad, exp_avg, exp_avg_sq, step_count, lr=0.03, weight_decay=0.01)
    torch.testing.assert_close(param, reference.detach(), rtol=1e-14, atol=1e-14)


# --- FAMO -------------------------------------------------------------------------------------


def test_famo_weights_are_on_the_simplex() -> None:
    famo = make_combiner("famo", num_tasks=4)
    famo.load_state_dict({**famo.state_dict(), "logits": f64(0.3, -1.0, 2.0, 0.0)})
    weights = step(famo, torch.eye(4, dtype=torch.float64), f64(0.1, 3.0, 10.0, 0.5)).weights
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_famo_moves_weight_to_the_task_whose_log_loss_decreased_least() -> None:
    famo = make_combiner("famo", num_tasks=3)
    grads = torch.eye(3, dtype=torch.float64)
    before = step(famo, grads, f64(1.0, 1.0, 1.0)).diagnostics["logit_weights"]
    famo.update_after_step(f64(0.5, 0.9, 0.99))  # task 2 improved least, task 0 most
    after = step(famo, grads, f64(1.0, 1.0, 1.0)).diagnostics["logit_weights"]
    assert after[2] > before[2]
    assert after[0] < before[0]
    assert after.argmax() == 2


def test_famo_update_matches_a_hand_computation_on_two_tasks() -> None:
    w_lr, gamma = 0.025, 0.01
    famo = make_combiner("famo", num_tasks=2, w_lr=w_lr, gamma=gamma)
    grads = torch.eye(2, dtype=torch.float64)
    # z = (½, ½), ℓ = (2, 1): z/ℓ = (¼, ½), c = 1/¾, w = (⅓, ⅔).
    weights = step(famo, grads, f64(2.0, 1.0)).weights
    torch.testing.assert_close(weights, f64(1 / 3, 2 / 3))
    # δ = log ℓ(before) - log ℓ(after) = (log 2, log 1.25);
    # gradient = z ⊙ (δ - zᵀδ) = ±¼ (δ_0 - δ_1).
    famo.update_after_step(f64(1.0, 0.8))
    g = 0.25 * (math.log(2.0) - math.log(1.25))
    # First Adam step from logits 0 (weight decay adds γ · 0): m̂ = g, v̂ = g²,
    # so the step is -lr g / (|g| + eps).
    logit = -w_lr * g / (abs(g) + 1e-8)
    torch.testing.assert_close(famo.state_dict()["logits"], f64(logit, -logit), rtol=1e-12, atol=0)
    # Next weights with equal losses are the softmax of the logits.
    weights = step(famo, grads, f64(1.0, 1.0)).weights
    expected = 1.0 / (1.0 + math.exp(-2 * logit))
    torch.testing.assert_close(weights, f64(expected, 1 - expected))


def test_famo_matches_the_authors_algorithm_written_with_autograd_and_torch_adam() -> None:
    """Three updates of FAMO as in the authors' famo.py (softmax logits, Adam with weight decay,
    autograd through the softmax), against our combiner."""
    num_tasks, w_lr, gamma = 3, 0.025, 0.01
    logits = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=w_lr, weight_decay=gamma)
    famo = make_combiner("famo", num_tasks=num_tasks, w_lr=w_lr, gamma=gamma)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        before = 0.5 + torch.rand(num_tasks, generator=generator, dtype=torch.float64)
        after = before * (0.5 + 0.5 * torch.rand(num_tasks, generator=generator).double())
        # The authors' weighted loss c · Σ z_i log(ℓ_i + eps), c detached: its gradient
        # w.r.t. ℓ_i is the coefficient of g_i in the update, our weight w_i.
        losses = before.clone().requires_grad_(True)
        z = torch.softmax(logits.detach(), dim=0)
        c = 1.0 / (z / (losses.detach() + 1e-8)).sum()
        (c * (z * (losses + 1e-8).log()).sum()).backward()
        ours = step(famo, torch.eye(num_tasks, dtype=torch.float64), before).weights
        torch.testing.assert_close(ours, losses.grad)
        # The authors' logit update.
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        with torch.enable_grad():
            (logits.grad,) = torch.autograd.grad(torch.softmax(logits, 0), logits, delta)
        optimizer.step()
        famo.update_after_step(after)
        torch.testing.assert_close(
            famo.state_dict()["logits"], logits.detach(), rtol=1e-12, atol=1e-15
        )


def test_famo_counts_nonpositive_losses_and_stays_finite() -> None:
    output = step(make_combiner("famo", num_tasks=3), torch.eye(3).double(), f64(1.0, -2.0, 0.0))
    assert int(output.diagnostics["nonpositive_losses"]) == 2
    assert torch.isfinite(output.weights).all()


# --- MoCo -------------------------------------------------------------------------------------


def test_moco_lambda_stays_on_the_simplex() -> None:
    moco = make_combiner("moco", num_tasks=5, gamma=10.0)
    for seed in range(6):
        grads = sample_task_gradients(tasks=5, dim=20, seed=seed, norms=[1e-3, 0.1, 1, 10, 1e3])
        lambdas = step(moco, grads, f64(0.5, 1, 2, 4, 8)).diagnostics["weights"]
        assert (lambdas >= 0).all()
        torch.testing.assert_close(lambdas.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_moco_tracks_the_loss_scaled_gradients_with_momentum_beta() -> None:
    beta = 0.3
    moco = make_combiner("moco", num_tasks=2, beta=beta)
    grads_1 = sample_task_gradients(tasks=2, dim=10, seed=1)
    grads_2 = sample_task_gradients(tasks=2, dim=10, seed=2)
    losses_1, losses_2 = f64(2.0, 0.5), f64(1.0, 3.0)

    def scaled(grads: Tensor, losses: Tensor) -> Tensor:  # h_i = ℓ_i g_i / ‖g_i‖
        return grads / (grads.norm(dim=1, keepdim=True) + 1e-8) * losses.unsqueeze(1)

    step(moco, grads_1, losses_1)
    tracked = moco.state_dict()["tracked_gradients"]
    torch.testing.assert_close(tracked, beta * scaled(grads_1, losses_1))
    output = step(moco, grads_2, losses_2)
    tracked = moco.state_dict()["tracked_gradients"]
    expected = (1 - beta) * beta * scaled(grads_1, losses_1) + beta * scaled(grads_2, losses_2)
    torch.testing.assert_close(tracked, expected)
    torch.testing.assert_close(output.direction, output.diagnostics["weights"] @ tracked)


def test_moco_lambda_update_is_a_softmax_step_on_the_tracked_gramian() -> None:
    beta, gamma, rho = 0.5, 0.1, 0.2
    moco = make_combiner("moco", num_tasks=3, beta=beta, gamma=gamma, rho=rho)
    grads = sample_task_gradients(tasks=3, dim=8, seed=3)
    output = step(moco, grads, f64(1.0, 2.0, 3.0))
    tracked = moco.state_dict()["tracked_gradients"]
    start = torch.full((3,), 1 / 3, dtype=torch.float64)
    expected = torch.softmax(start - gamma * (tracked @ tracked.T + rho * torch.eye(3)) @ start, 0)
    torch.testing.assert_close(output.diagnostics["weights"], expected)


# --- UW ---------------------------------------------------------------------------------------


def test_uw_objective_is_stationary_at_log_losses() -> None:
    losses = f64(0.5, 2.0, 8.0)
    log_variances = losses.log().requires_grad_(True)
    objective = (0.5 * torch.exp(-log_variances) * losses + 0.5 * log_variances).sum()
    (gradient,) = torch.autograd.grad(objective, log_variances)
    torch.testing.assert_close(gradient, torch.zeros(3, dtype=torch.float64))
    # The combiner started at s = log ℓ does not move.
    uw = make_combiner("uw", num_tasks=3)
    uw.load_state_dict({**uw.state_dict(), "log_variances": losses.log()})
    weights = step(uw, torch.eye(3).double(), losses).weights
    torch.testing.assert_close(weights, 0.5 / losses)
    torch.testing.assert_close(uw.state_dict()["log_variances"], losses.log(), atol=1e-6, rtol=0)


def test_uw_log_variances_converge_to_log_losses_on_constant_losses() -> None:
    losses = f64(0.5, 2.0, 8.0)
    uw = make_combiner("uw", num_tasks=3)
    first = step(uw, torch.eye(3).double(), losses).weights
    torch.testing.assert_close(first, f64(0.5, 0.5, 0.5))  # s = 0 at start: w = ½ exp(0)
    for _ in range(2000):
        weights = step(uw, torch.eye(3).double(), losses).weights
    torch.testing.assert_close(uw.state_dict()["log_variances"], losses.log(), atol=0.05, rtol=0)
    torch.testing.assert_close(weights, 0.5 / losses, rtol=0.06, atol=0)


# --- DWA --------------------------------------------------------------------------------------


def test_dwa_pinned_weights() -> None:
    dwa = make_combiner("dwa", num_tasks=2, temperature=2.0)
    grads = torch.eye(2, dtype=torch.float64)
    assert torch.equal(step(dwa, grads, f64(1.0, 2.0)).weights, f64(1.0, 1.0))
    assert torch.equal(step(dwa, grads, f64(0.5, 1.5)).weights, f64(1.0, 1.0))
    # r = (0.5/1, 1.5/2) = (0.5, 0.75); w = 2 softmax(r / 2).
    third = step(dwa, grads, f64(9.0, 9.0)).weights
    e0, e1 = math.exp(0.25), math.exp(0.375)
    torch.testing.assert_close(third, f64(2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)))
    # The next ratios are (9/0.5, 9/1.5) = (18, 6).
    fourth = step(dwa, grads, f64(1.0, 1.0)).weights
    e0, e1 = math.exp(9.0), math.exp(3.0)
    torch.testing.assert_close(fourth, f64(2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)))


def test_dwa_weights_sum_to_the_number_of_tasks() -> None:
    dwa = make_combiner("dwa", num_tasks=4, temperature=0.5)
    for seed in range(4):
        losses = 0.1 + torch.rand(4, generator=torch.Generator().manual_seed(seed)).double()
        weights = step(dwa, torch.eye(4).double(), losses).weights
    torch.testing.assert_close(weights.sum(), torch.tensor(4.0, dtype=torch.float64))


# --- RLW --------------------------------------------------------------------------------------


def test_rlw_weights_are_random_points_of_the_simplex_reproducible_from_the_seed() -> None:
    torch.manual_seed(0)
    rlw = make_combiner("rlw", num_tasks=4)
    draws = [step(rlw, torch.eye(4).double(), None).weights for _ in range(3)]
    for weights in draws:
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(0)
    again = make_combiner("rlw", num_tasks=4)
    assert all(torch.equal(step(again, torch.eye(4).double(), None).weights, w) for w in draws)
    torch.manual_seed(1)
    other = make_combiner("rlw", num_tasks=4)
    assert not torch.equal(step(other, torch.eye(4).double(), None).weights, draws[0])


# --- GradDrop ---------------------------------------------------------------------------------


def test_graddrop_keeps_coordinates_where_all_tasks_agree_in_sign() -> None:
    grads = sample_task_gradients(tasks=3, dim=60, seed=0).abs()
    grads[:, 30:] *= -1  # coordinates 0..29 all positive, 30..59 all negative
    grads[:, 10] = 1e-30  # tiny but unanimous
    for seed in range(5):
        torch.manual_seed(seed)
        direction = combine("graddrop", grads)
        assert torch.equal(direction, grads.sum(dim=0))


def test_graddrop_keeps_only_positive_or_only_negative_components_per_coordinate() -> None:
    grads = sample_task_gradients(tasks=4, dim=200, seed=1)
    positive_sum = grads.clamp_min(0).sum(dim=0)
    negative_sum = grads.clamp_max(0).sum(dim=0)
    torch.manual_seed(0)
    direction = combine("graddrop", grads)
    is_positive = torch.isclose(direction, positive_sum, rtol=1e-12, atol=0)
    is_negative = torch.isclose(direction, negative_sum, rtol=1e-12, atol=0)
    assert (is_positive | is_negative).all()
    assert is_positive.any() and is_negative.any()


def test_graddrop_keeps_the_positive_side_with_probability_p() -> None:
    # Every coordinate is g = (3, -1): P = ½ (1 + 2/4) = 0.75.
    grads = torch.tensor([[3.0], [-1.0]], dtype=torch.float64).repeat(1, 4000)
    uniform = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction = sign_dropout(grads, uniform)
    kept_positive = (direction == 3.0).double().mean()
    assert abs(float(kept_positive) - 0.75) < 0.03
    assert ((direction == 3.0) | (direction == -1.0)).all()


# --- SI ---------------------------------------------------------------------------------------


def test_si_direction_is_the_sum_of_gradients_over_losses() -> None:
    grads = sample_task_gradients(tasks=3, dim=12, seed=2)
    losses = f64(0.2, 1.0, 50.0)
    direction = combine("si", grads, losses=losses)
    torch.testing.assert_close(direction, (grads / losses.unsqueeze(1)).sum(dim=0))


def test_si_is_invariant_to_rescaling_one_task_loss() -> None:
    grads = sample_task_gradients(tasks=3, dim=12, seed=3)
    losses = f64(0.2, 1.0, 50.0)
    scale = f64(1.0, 1e3, 1.0)  # ℓ_1 → 1000 ℓ_1 multiplies its gradient by 1000 too
    rescaled = combine("si", grads * scale.unsqueeze(1), losses=losses * scale)
    torch.testing.assert_close(rescaled, combine("si", grads, losses=losses))


def test_si_floors_nonpositive_losses_and_reports_them() -> None:
    si = make_combiner("si", num_tasks=2)
    output = step(si, torch.eye(2).double(), f64(-1.0, 2.0))
    assert int(output.diagnostics["nonpositive_losses"]) == 1
    torch.testing.assert_close(output.weights, f64(1e8, 0.5))
