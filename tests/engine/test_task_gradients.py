"""The engine's per-task Jacobian, Gramian and update against plain autograd, one task at a time."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtrl_ntk.combiners import Need, available_combiners, make_combiner
from mtrl_ntk.combiners.base import CombinerOutput, GradientCombiner, TaskStats
from mtrl_ntk.engine import TaskGradientEngine, per_task_jacobian

TASKS, PER_TASK, IN, HIDDEN = 3, 8, 5, 6


class TinyMultiHead(nn.Module):
    """A shared trunk and one linear head per task (heads are task-specific)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(IN, HIDDEN)
        self.heads = nn.Parameter(torch.randn(TASKS, HIDDEN, dtype=torch.float64))

    def forward(self, x: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.tanh(self.trunk(x))  # [B, h]
        return (z * self.heads[task_ids]).sum(-1), z


def make_problem(seed: int = 0) -> tuple[TinyMultiHead, dict[str, Tensor]]:
    torch.manual_seed(seed)
    model = TinyMultiHead().double()
    batch = {
        "x": torch.randn(TASKS, PER_TASK, IN, dtype=torch.float64),
        "y": torch.randn(TASKS, PER_TASK, dtype=torch.float64),
        "task_ids": torch.arange(TASKS).repeat_interleave(PER_TASK).view(TASKS, PER_TASK),
    }
    # Very different task scales, so that weightings matter.
    batch["y"] = batch["y"] * torch.tensor([1.0, 10.0, 100.0]).view(-1, 1)
    return model, batch


def loss_fn_for(model: nn.Module):
    def loss_fn(params: dict[str, Tensor], data: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        prediction, z = torch.func.functional_call(model, params, (data["x"], data["task_ids"]))
        return (prediction - data["y"]) ** 2, z

    return loss_fn


def is_head(name: str) -> bool:
    return name == "heads"


def reference_task_grads(model: nn.Module, batch: dict[str, Tensor], rows: slice | None = None):
    """Gradient of each task's mean loss, one autograd.grad call per task."""
    grads = []
    for task in range(TASKS):
        x, y, ids = (batch[k][task] for k in ("x", "y", "task_ids"))
        if rows is not None:
            x, y, ids = x[rows], y[rows], ids[rows]
        prediction, _ = model(x, ids)
        loss = ((prediction - y) ** 2).mean()
        names, params = zip(*model.named_parameters())
        grads.append(dict(zip(names, torch.autograd.grad(loss, params))))
    return grads


def flat_shared(grads: dict[str, Tensor], model: nn.Module) -> Tensor:
    """Shared-parameter gradients flattened in the engine's order (module order)."""
    return torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters() if not is_head(n)])


def test_jacobian_matches_autograd_one_task_at_a_time() -> None:
    model, batch = make_problem()
    shared = {n: p.detach() for n, p in model.named_parameters() if not is_head(n)}
    specific = {"heads": model.heads.detach()}
    shared_jacobian, specific_jacobian, losses = per_task_jacobian(
        loss_fn_for(model), shared, specific, batch, num_minibatches=2
    )
    jacobian = shared_jacobian.full()
    specific_grads = specific_jacobian.blocks
    assert jacobian.shape == (TASKS, 2, sum(p.numel() for p in shared.values()))
    half = PER_TASK // 2
    for m, rows in enumerate([slice(0, half), slice(half, PER_TASK)]):
        reference = reference_task_grads(model, batch, rows)
        for task in range(TASKS):
            torch.testing.assert_close(jacobian[task, m], flat_shared(reference[task], model))
            torch.testing.assert_close(specific_grads["heads"][task, m], reference[task]["heads"])
    full = reference_task_grads(model, batch)
    torch.testing.assert_close(jacobian.mean(1), torch.stack([flat_shared(g, model) for g in full]))
    assert losses.shape == (TASKS, 2)


class Recorder(GradientCombiner):
    """Records the stats it receives and returns fixed weights."""

    name = "recorder"

    def __init__(self, need: Need, weights: Tensor, num_minibatches: int = 1) -> None:
        super().__init__(TASKS)
        self.need = need  # type: ignore[misc]
        self.fixed = weights
        self.num_minibatches = num_minibatches
        self.stats: TaskStats | None = None

    def combine(self, stats: TaskStats) -> CombinerOutput:
        self.stats = stats
        return CombinerOutput(weights=self.fixed)


WEIGHTS = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)


@pytest.mark.parametrize("need", [Need.LOSSES, Need.GRAMIAN, Need.JACOBIAN | Need.NTK_BLOCKS])
def test_every_path_writes_the_gradient_of_the_weighted_loss(need: Need) -> None:
    model, batch = make_problem()
    engine = TaskGradientEngine(model, TASKS, is_head)
    combiner = Recorder(need, WEIGHTS)
    result = engine.backward(loss_fn_for(model), batch, combiner)
    reference = reference_task_grads(model, batch)
    for name, param in model.named_parameters():
        expected = sum(WEIGHTS[t] * reference[t][name] for t in range(TASKS))
        torch.testing.assert_close(param.grad, expected)
    assert bool(result.finite)
    expected_losses = torch.stack(
        [((model(batch["x"][t], batch["task_ids"][t])[0] - batch["y"][t]) ** 2).mean()
         for t in range(TASKS)]
    )
    torch.testing.assert_close(result.losses, expected_losses.detach())


def test_gramian_and_ntk_blocks_are_those_of_the_jacobian() -> None:
    model, batch = make_problem()
    engine = TaskGradientEngine(model, TASKS, is_head)
    combiner = Recorder(Need.GRAMIAN | Need.NTK_BLOCKS, WEIGHTS, num_minibatches=4)
    engine.backward(loss_fn_for(model), batch, combiner)
    stats = combiner.stats
    assert stats is not None and stats.gramian is not None and stats.ntk_blocks is not None
    g = torch.stack([flat_shared(grads, model) for grads in reference_task_grads(model, batch)])
    torch.testing.assert_close(stats.gramian, g @ g.T)
    quarter = PER_TASK // 4
    for task in range(TASKS):
        rows = []
        for m in range(4):
            grads = reference_task_grads(model, batch, slice(m * quarter, (m + 1) * quarter))
            rows.append(flat_shared(grads[task], model))
        rows = torch.stack(rows)
        torch.testing.assert_close(stats.ntk_blocks[task], rows @ rows.T)


def test_representation_jacobian_sums_per_sample_gradients_over_each_minibatch() -> None:
    model, batch = make_problem()
    engine = TaskGradientEngine(model, TASKS, is_head)
    combiner = Recorder(Need.REPRESENTATION_NTK, WEIGHTS, num_minibatches=2)
    engine.backward(loss_fn_for(model), batch, combiner)
    rep = combiner.stats.representation_jacobian
    assert rep.shape == (TASKS, 2, HIDDEN)
    half = PER_TASK // 2
    for task in range(TASKS):
        for m in range(2):
            rows = slice(m * half, (m + 1) * half)
            z = torch.tanh(model.trunk(batch["x"][task, rows])).detach().requires_grad_()
            prediction = (z * model.heads[task]).sum(-1)
            loss = ((prediction - batch["y"][task, rows]) ** 2).mean()
            (z_grad,) = torch.autograd.grad(loss, z)
            torch.testing.assert_close(rep[task, m], z_grad.sum(0))
    # The update is still the gradient of the weighted loss.
    reference = reference_task_grads(model, batch)
    expected = sum(WEIGHTS[t] * reference[t]["trunk.weight"] for t in range(TASKS))
    torch.testing.assert_close(model.trunk.weight.grad, expected)


def test_ntkmtl_through_the_engine_equalises_weighted_eigenvalues() -> None:
    model, batch = make_problem()
    engine = TaskGradientEngine(model, TASKS, is_head)
    combiner = make_combiner("ntkmtl", TASKS, num_minibatches=2)
    result = engine.backward(loss_fn_for(model), batch, combiner)
    weights = result.output.weights
    eigenvalues = result.output.diagnostics["ntk_eigenvalues"]
    balanced = weights**2 * eigenvalues
    torch.testing.assert_close(balanced, torch.full_like(balanced, eigenvalues.mean().item()))


def test_engine_rejects_batches_it_cannot_split_or_group() -> None:
    model, batch = make_problem()
    engine = TaskGradientEngine(model, TASKS, is_head)
    with pytest.raises(ValueError, match="mini-batches"):
        split_in_three = make_combiner("ntkmtl", TASKS, num_minibatches=3)
        engine.backward(loss_fn_for(model), batch, split_in_three)
    with pytest.raises(ValueError, match="task rows"):
        engine.backward(loss_fn_for(model), {k: v[:2] for k, v in batch.items()},
                        make_combiner("ls", TASKS))
    with pytest.raises(ValueError, match="built for"):
        engine.backward(loss_fn_for(model), batch, make_combiner("ls", TASKS + 1))


def test_non_finite_loss_is_flagged() -> None:
    model, batch = make_problem()
    batch["y"][1, 0] = float("nan")
    engine = TaskGradientEngine(model, TASKS, is_head)
    for name in ("ls", "ntkmtl"):
        result = engine.backward(loss_fn_for(model), batch, make_combiner(name, TASKS))
        assert not bool(result.finite)


class Independent(nn.Module):
    """One linear model per task, all parameters task-specific."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(TASKS, IN, dtype=torch.float64))

    def forward(self, x: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        return (x * self.weight[task_ids]).sum(-1), x


@pytest.mark.parametrize("name", ["ntkmtl", "graddrop", "mgda", "ls"])
def test_without_shared_parameters_every_combiner_gives_each_task_its_own_gradient(
    name: str,
) -> None:
    if name not in available_combiners():
        pytest.skip(f"{name} is not registered")
    _, batch = make_problem()
    model = Independent()
    engine = TaskGradientEngine(model, TASKS, lambda name: True)
    result = engine.backward(loss_fn_for(model), batch, make_combiner(name, TASKS))
    assert bool(result.finite)
    weights = result.output.weights.to(torch.float64)
    for task in range(TASKS):
        x, y = batch["x"][task], batch["y"][task]
        loss = (((x * model.weight[task]).sum(-1) - y) ** 2).mean()
        (own,) = torch.autograd.grad(loss, model.weight)
        torch.testing.assert_close(model.weight.grad[task], weights[task] * own[task])
