"""Per-task gradients, their Gramian (the extended NTK) and the update, in one batched pass.

Each task's loss depends only on its own samples, so with a batch grouped as
[T, B_t, ...] the T per-task gradients (and the n mini-batch gradients of each
task that NTKMTL's blocks need) come from one ``torch.func.vmap`` of ``grad`` over
the task (x mini-batch) axis: about the FLOPs of one ordinary backward pass,
instead of the T full backward passes of the research code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtrl_ntk import foreach
from mtrl_ntk.combiners.base import CombinerOutput, GradientCombiner, Need, TaskStats

# loss_fn(params, batch) -> (per-sample losses [B], shared representation z [B, h] or None).
# ``batch`` holds tensors with a leading sample axis [B, ...] (always "task_ids" [B]);
# the function must be vmap-compatible: no .item(), no RNG, no data-dependent branching.
LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], tuple[Tensor, Tensor | None]]

_JACOBIAN_NEEDS = Need.GRAMIAN | Need.JACOBIAN | Need.NTK_BLOCKS

# Row products R x k x R with few rows (R = T*n <= 16) are memory-bound: on the CPU, MKL
# streams the whole [R, k] block for packing and again for the product. In column chunks
# of about 1 MiB the second read hits the cache: 1.6x faster for the 3x400 critic at T = 10
# (4.8 ms instead of 7.6 ms per update, one thread). With more rows the product is
# compute-bound and one call is as fast; on a GPU one call is always best.
_CHUNKED_PRODUCT_MAX_ROWS = 16
_CHUNK_ELEMENTS = 1 << 18


@dataclass
class EngineResult:
    """What one engine pass produced, all detached (no host synchronisation)."""

    losses: Tensor  # [T] per-task mean losses
    output: CombinerOutput
    gramian: Tensor | None  # [T, T] Gramian of the task gradients, when computed
    finite: Tensor  # bool scalar: losses and written gradients are all finite


def group_batch(batch: dict[str, Tensor], num_tasks: int) -> tuple[int, int]:
    """Check that every tensor of ``batch`` is grouped [T, B_t, ...]; return (T, B_t)."""
    if not batch:
        raise ValueError("empty batch")
    shapes = {key: tuple(value.shape[:2]) for key, value in batch.items()}
    first = next(iter(shapes.values()))
    if any(shape != first for shape in shapes.values()) or len(first) != 2:
        raise ValueError(f"batch tensors must all be grouped [T, B_t, ...]; got {shapes}")
    if first[0] != num_tasks:
        raise ValueError(f"batch has {first[0]} task rows, the engine expects {num_tasks}")
    return first


def _reshape_leading(batch: dict[str, Tensor], *leading: int) -> dict[str, Tensor]:
    return {key: value.reshape(*leading, *value.shape[2:]) for key, value in batch.items()}


def _flat_forward(
    loss_fn: LossFn, params: dict[str, Tensor], batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor | None]:
    """``loss_fn`` on the whole batch [T, B_t, ...] flattened to [T * B_t, ...]."""
    num_tasks, per_task = next(iter(batch.values())).shape[:2]
    return loss_fn(params, _reshape_leading(batch, num_tasks * per_task))


@dataclass
class TaskJacobian:
    """Per-parameter blocks of the per-task, per-mini-batch Jacobian.

    Kept per parameter ([T, n, *shape] each) rather than concatenated into one
    [T, n, d] matrix: the Gramian, the NTK blocks and the update Jᵀw are sums of
    per-parameter products, and skipping the concatenation saves a copy of the
    whole Jacobian (the largest memory traffic of the update).
    """

    blocks: dict[str, Tensor]  # name -> [T, n, *shape]
    num_tasks: int
    num_minibatches: int

    def _rows(self, block: Tensor) -> Tensor:  # [T, n, k]
        return block.reshape(self.num_tasks, self.num_minibatches, -1)

    def extended_ntk(self) -> Tensor:
        """The extended NTK J Jᵀ over all T*n mini-batch rows (paper Eq. 9), [T*n, T*n] float64.

        One read of the Jacobian (the products are memory-bound, so the n² larger
        output costs nothing); formed in the gradients' dtype, returned in float64.
        """
        size = self.num_tasks * self.num_minibatches
        total = None
        for block in self.blocks.values():
            rows = block.reshape(size, -1)
            if foreach.in_seed_axis():  # under vmap: no in-place sum into an unbatched zero
                product = rows @ rows.T
                total = product if total is None else total + product
                continue
            if total is None:
                total = rows.new_zeros(size, size)
            _add_row_products(total, rows)
        if total is None:  # no shared parameters
            return torch.zeros(size, size, dtype=torch.float64)
        return total.double()

    def gramian_and_blocks(self) -> tuple[Tensor, Tensor]:
        """G Gᵀ of the task gradients [T, T] and the NTK blocks K_ii [T, n, n], float64.

        g_i is the mean of task i's n rows, so G Gᵀ is the extended NTK averaged
        over each n x n block; K_ii are its diagonal blocks.
        """
        t, n = self.num_tasks, self.num_minibatches
        ntk = self.extended_ntk().view(t, n, t, n)
        gramian = ntk.mean(dim=(1, 3))
        blocks = ntk.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [T, n, n]
        return gramian, blocks

    def full(self) -> Tensor:
        """The whole Jacobian [T, n, d], parameters in order (one concatenation)."""
        rows = [self._rows(block) for block in self.blocks.values()]
        if not rows:
            return torch.zeros(self.num_tasks, self.num_minibatches, 0)
        return torch.cat(rows, dim=2)

    def weighted_sum(self, name: str, weights: Tensor) -> Tensor:
        """Σ_i w_i g_i for one parameter, in its shape."""
        block = self.blocks[name]
        n = self.num_minibatches
        # g_i is the mean of task i's n rows: contract (task, mini-batch) in one product.
        row_weights = weights.to(block.dtype).repeat_interleave(n) / n  # [T*n]
        return torch.tensordot(row_weights, block.flatten(0, 1), dims=1)


def _add_row_products(total: Tensor, rows: Tensor) -> None:
    """total += rows @ rows.T for rows [R, k], in cache-sized column chunks where that is faster."""
    num_rows, width = rows.shape
    if rows.device.type != "cpu" or num_rows > _CHUNKED_PRODUCT_MAX_ROWS:
        total.addmm_(rows, rows.T)
        return
    step = max(1, _CHUNK_ELEMENTS // num_rows)
    for start in range(0, width, step):
        chunk = rows[:, start : start + step]
        total.addmm_(chunk, chunk.T)


def weights_like(weights: Tensor, like: Tensor) -> Tensor:
    """``weights`` in the dtype and on the device of ``like``, without a host synchronisation.

    Combiners that compute on the host (LS's constant weights, the Gramian solvers) return
    CPU tensors; a plain copy to a CUDA device from pageable memory waits for the GPU's
    queue. Through pinned memory the copy is queued like a kernel and the host goes on.
    """
    weights = weights.to(dtype=like.dtype)
    if weights.device == like.device:
        return weights
    if weights.device.type == "cpu" and like.device.type == "cuda":
        return weights.pin_memory().to(like.device, non_blocking=True)
    return weights.to(like.device)


def all_finite(tensors: list[Tensor]) -> Tensor:
    """Bool scalar: no NaN or infinity in any of the (non-empty) ``tensors``; no host sync.

    The max-norm of every tensor in one multi-tensor op (one kernel on a GPU, however
    many tensors): it propagates NaN, an infinity is its own max-norm, and unlike a sum
    or a 2-norm it cannot overflow on finite values. Much faster than
    ``isfinite(t).all()``, which writes a bool tensor of the whole size first.
    """
    if not tensors:
        return torch.tensor(True)  # nothing to check (no device to put it on either)
    return torch.isfinite(foreach.max_norms(tensors)).all()


def per_task_jacobian(
    loss_fn: LossFn,
    shared: dict[str, Tensor],
    specific: dict[str, Tensor],
    batch: dict[str, Tensor],
    num_minibatches: int = 1,
) -> tuple[TaskJacobian, TaskJacobian, Tensor]:
    """Gradients of every task's loss on each of its n mini-batches, by one vmapped pass.

    ``batch`` is grouped [T, B_t, ...]. Returns the Jacobian blocks of the shared
    and of the task-specific parameters, and the mini-batch mean losses [T, n].
    """
    num_tasks, per_task = next(iter(batch.values())).shape[:2]
    if per_task % num_minibatches:
        raise ValueError(
            f"{per_task} samples per task cannot be split into {num_minibatches} equal mini-batches"
        )
    slices = _reshape_leading(batch, num_tasks * num_minibatches, per_task // num_minibatches)

    def slice_loss(
        shared_params: dict[str, Tensor],
        specific_params: dict[str, Tensor],
        data: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        losses, _ = loss_fn({**shared_params, **specific_params}, data)
        loss = losses.mean()
        return loss, loss.detach()

    grad_fn = torch.func.grad(slice_loss, argnums=(0, 1), has_aux=True)
    (shared_grads, specific_grads), slice_losses = torch.func.vmap(
        grad_fn, in_dims=(None, None, 0)
    )(shared, specific, slices)
    def blocks(grads: dict[str, Tensor]) -> TaskJacobian:
        shaped = {
            name: g.view(num_tasks, num_minibatches, *g.shape[1:]) for name, g in grads.items()
        }
        return TaskJacobian(shaped, num_tasks, num_minibatches)

    return (
        blocks(shared_grads),
        blocks(specific_grads),
        slice_losses.view(num_tasks, num_minibatches),
    )


class TaskGradientEngine:
    """Computes the task statistics a combiner declares, calls it, and writes ``.grad``.

    Shared parameters receive the combiner's update Σ_i w_i g_i (or its direction);
    task-specific parameters (``is_task_specific(name)``) receive the gradient of
    Σ_i w_i ℓ_i, i.e. their own task's gradient times its weight (weight 1 for
    combiners that return a direction). Three paths, chosen by ``combiner.need``:

    - loss-based (nothing beyond losses): one forward, the weights, one backward
      of the weighted loss (LS, UW, DWA, RLW, SI, FAMO);
    - representation NTK (NTKMTL-SR): one forward, a backward of the mini-batch
      losses to z only (through the task-specific layers), the weights, one
      backward of the weighted loss;
    - Jacobian (Gramian methods, NTKMTL, GradDrop, MoCo): the per-task Jacobian
      of the shared parameters by one vmapped pass, its Gramian / NTK blocks,
      the combiner, then the update Jᵀw without another backward.

    The caller never branches on the combiner's name. ``gradients`` returns the
    combined gradient per parameter (for ``CapturableAdam``, inside a captured
    update); ``backward`` writes it into ``.grad`` (for a ``torch.optim`` step);
    then ``after_step``. Every path is static-shape tensor code without host
    reads, as long as the combiner keeps the capture contract
    (``mtrl_ntk.combiners.base``), so the agent compiles the whole update around it.
    """

    def __init__(
        self,
        module: nn.Module,
        num_tasks: int,
        is_task_specific: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.module = module
        self.num_tasks = num_tasks
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shared_names = [n for n in self.params if not is_task_specific(n)]
        self.specific_names = [n for n in self.params if is_task_specific(n)]
        # d, the number of shared parameters: the width of the task Jacobian.
        self.shared_dim = sum(self.params[n].numel() for n in self.shared_names)

    def backward(
        self,
        loss_fn: LossFn,
        batch: dict[str, Tensor],
        combiner: GradientCombiner,
        random: Tensor | None = None,
    ) -> EngineResult:
        """``gradients`` written into the parameters' ``.grad`` (for a ``torch.optim`` step)."""
        grads, result = self.gradients(loss_fn, batch, combiner, random)
        for param, grad in zip(self.params.values(), grads):
            param.grad = grad
        return result

    def gradients(
        self,
        loss_fn: LossFn,
        batch: dict[str, Tensor],
        combiner: GradientCombiner,
        random: Tensor | None = None,
    ) -> tuple[list[Tensor], EngineResult]:
        """One combined gradient for ``batch`` (grouped [T, B_t, ...]), one per parameter in
        the order of ``self.params``; nothing is written into ``.grad``.

        ``random`` is the combiner's ``draw_random`` for this update (see the capture
        contract in ``mtrl_ntk.combiners.base``); the combiner draws it itself when None.
        """
        group_batch(batch, self.num_tasks)
        if combiner.num_tasks != self.num_tasks:
            raise ValueError(
                f"combiner {combiner.name!r} was built for {combiner.num_tasks} tasks, "
                f"the engine has {self.num_tasks}"
            )
        need = combiner.need
        if need & _JACOBIAN_NEEDS and self.shared_names:
            return self._jacobian_path(loss_fn, batch, combiner, random)
        if Need.REPRESENTATION_NTK in need:
            return self._representation_path(loss_fn, batch, combiner, random)
        return self._loss_path(loss_fn, batch, combiner, random)

    @torch.no_grad()
    def after_step(
        self, loss_fn: LossFn, batch: dict[str, Tensor], combiner: GradientCombiner
    ) -> None:
        """Feed the combiner the per-task losses after the update, if it asked for them."""
        if Need.LOSSES_AFTER_STEP not in combiner.need:
            return
        num_tasks, per_task = group_batch(batch, self.num_tasks)
        losses, _ = _flat_forward(loss_fn, self.params, batch)
        combiner.update_after_step(losses.view(num_tasks, per_task).mean(dim=1).detach())

    # -- the three paths -------------------------------------------------------------

    def _loss_path(
        self, loss_fn: LossFn, batch: dict[str, Tensor], combiner: GradientCombiner,
        random: Tensor | None,
    ) -> tuple[list[Tensor], EngineResult]:
        num_tasks, per_task = group_batch(batch, self.num_tasks)

        def task_losses_of(params: dict[str, Tensor]) -> Tensor:
            losses, _ = _flat_forward(loss_fn, params, batch)
            return losses.view(num_tasks, per_task).mean(dim=1)  # [T]

        pullback = None
        if foreach.in_seed_axis():  # under vmap over seeds: torch.func, not autograd.grad
            task_losses, pullback = torch.func.vjp(task_losses_of, self.params)
        else:
            task_losses = task_losses_of(self.params)
        stats = TaskStats(num_tasks=num_tasks, losses=task_losses.detach(), random=random)
        device = task_losses.device
        if combiner.need & _JACOBIAN_NEEDS:
            # No shared parameters (the `independent` architecture): the Jacobian of the
            # shared parameters is [T, n, 0], its Gramian and NTK blocks are zero, and a
            # combiner's weights only rescale each task's own network.
            n = combiner.num_minibatches
            stats.num_minibatches = n
            stats.jacobian = task_losses.new_zeros(num_tasks, n, 0)
            stats.gramian = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)
            stats.ntk_blocks = torch.zeros(num_tasks, n, n, dtype=torch.float64, device=device)
        output = combiner.combine(stats)
        if output.direction is not None:
            output = CombinerOutput(
                weights=torch.ones(num_tasks, dtype=torch.float64, device=device),
                diagnostics={**output.diagnostics, "direction": "no shared parameters"},
            )
        return self._backward_weighted(task_losses, output, pullback)

    def _representation_path(
        self, loss_fn: LossFn, batch: dict[str, Tensor], combiner: GradientCombiner,
        random: Tensor | None,
    ) -> tuple[list[Tensor], EngineResult]:
        num_tasks, per_task = group_batch(batch, self.num_tasks)
        n = combiner.num_minibatches
        if per_task % n:
            raise ValueError(
                f"{per_task} samples per task cannot be split into {n} equal mini-batches"
            )
        if foreach.in_seed_axis():
            return self._representation_path_func(loss_fn, batch, combiner, random)
        losses, representation = loss_fn(self.params, _reshape_leading(batch, num_tasks * per_task))
        if representation is None:
            raise ValueError(
                f"combiner {combiner.name!r} needs the shared representation, "
                "but the loss function returned none"
            )
        minibatch_losses = losses.view(num_tasks, n, per_task // n).mean(dim=2)  # [T, n]
        # Each sample's z only feeds its own mini-batch loss, so one backward to z gives
        # every ∂ℓ_{i,m}/∂z_u at once; summing over the mini-batch's samples gives the row
        # of J_i(z) whose inner products are Eq. 17's kernel.
        (z_grad,) = torch.autograd.grad(minibatch_losses.sum(), representation, retain_graph=True)
        output = self._combine_representation(combiner, minibatch_losses, z_grad, random)
        return self._backward_weighted(minibatch_losses.mean(dim=1), output)

    def _combine_representation(
        self, combiner: GradientCombiner, minibatch_losses: Tensor, z_grad: Tensor,
        random: Tensor | None,
    ) -> CombinerOutput:
        """The combiner's output from the mini-batch losses [T, n] and ∂(Σ ℓ_{i,m})/∂z
        [T * B_t, h]: summing each mini-batch's samples gives the rows of J_i(z)."""
        num_tasks, n = minibatch_losses.shape
        representation_jacobian = z_grad.reshape(num_tasks, n, -1, z_grad.shape[-1]).sum(dim=2)
        stats = TaskStats(
            num_tasks=num_tasks,
            num_minibatches=n,
            losses=minibatch_losses.mean(dim=1).detach(),
            representation_jacobian=representation_jacobian.detach(),
            random=random,
        )
        return self._combine(combiner, stats, has_jacobian=False)

    def _representation_path_func(
        self, loss_fn: LossFn, batch: dict[str, Tensor], combiner: GradientCombiner,
        random: Tensor | None,
    ) -> tuple[list[Tensor], EngineResult]:
        """``_representation_path`` with ``torch.func`` (under vmap over seeds).

        ∂ℓ/∂z is the gradient with respect to a zero ``representation_offset`` added to z
        (the model's forward takes it); the weighted loss then needs a second forward,
        as ``torch.func`` cannot reuse one forward for two sets of inputs.
        """
        num_tasks, per_task = group_batch(batch, self.num_tasks)
        n = combiner.num_minibatches
        flat = _reshape_leading(batch, num_tasks * per_task)

        def minibatch_losses_of(
            params: dict[str, Tensor], offset: Tensor | None
        ) -> Tensor:  # [T, n]
            losses, _ = loss_fn(params, {**flat, "representation_offset": offset})
            return losses.view(num_tasks, n, per_task // n).mean(dim=2)

        width = getattr(self.module, "representation_dim", None)
        if width is None:
            raise ValueError(
                f"combiner {combiner.name!r} in a seed group needs the module's "
                "representation_dim and a representation_offset argument"
            )
        reference = next(iter(self.params.values()))
        offset = torch.zeros(
            num_tasks * per_task, width, dtype=reference.dtype, device=reference.device
        )
        minibatch_losses, pullback_z = torch.func.vjp(
            lambda offset: minibatch_losses_of(self.params, offset), offset
        )
        (z_grad,) = pullback_z(torch.ones_like(minibatch_losses))
        output = self._combine_representation(combiner, minibatch_losses, z_grad, random)
        task_losses, pullback = torch.func.vjp(
            lambda params: minibatch_losses_of(params, None).mean(dim=1), self.params
        )
        return self._backward_weighted(task_losses, output, pullback)

    def _jacobian_path(
        self, loss_fn: LossFn, batch: dict[str, Tensor], combiner: GradientCombiner,
        random: Tensor | None,
    ) -> tuple[list[Tensor], EngineResult]:
        need = combiner.need
        shared = {n: self.params[n].detach() for n in self.shared_names}
        specific = {n: self.params[n].detach() for n in self.specific_names}
        shared_jacobian, specific_jacobian, minibatch_losses = per_task_jacobian(
            loss_fn, shared, specific, batch, combiner.num_minibatches
        )
        # The Gramian is always formed (T x d x T, cheap next to the Jacobian): the trainer
        # logs it as the task-affinity matrix. Formed in the gradients' dtype, solved in float64.
        gramian, ntk_blocks = shared_jacobian.gramian_and_blocks()
        jacobian = shared_jacobian.full() if Need.JACOBIAN in need else None
        stats = TaskStats(
            num_tasks=self.num_tasks,
            num_minibatches=combiner.num_minibatches,
            losses=minibatch_losses.mean(dim=1),
            jacobian=jacobian,
            gramian=gramian,
            ntk_blocks=ntk_blocks if Need.NTK_BLOCKS in need else None,
            random=random,
        )
        output = self._combine(combiner, stats, has_jacobian=True)
        dtype, device = minibatch_losses.dtype, minibatch_losses.device
        finite = torch.isfinite(stats.losses).all()
        grads: dict[str, Tensor] = {}
        if output.direction is not None:
            direction = output.direction.to(dtype)
            task_weights = torch.ones(self.num_tasks, dtype=dtype, device=device)
            offset = 0
            for name in self.shared_names:
                param = self.params[name]
                grads[name] = direction[offset : offset + param.numel()].view_as(param).clone()
                offset += param.numel()
        else:
            task_weights = weights_like(output.weights, minibatch_losses)
            for name in self.shared_names:
                grads[name] = shared_jacobian.weighted_sum(name, task_weights)
        for name in self.specific_names:
            grads[name] = specific_jacobian.weighted_sum(name, task_weights)
        ordered = [grads[name] for name in self.params]
        finite = finite & all_finite(ordered)
        result = EngineResult(losses=stats.losses, output=output, gramian=gramian, finite=finite)
        return ordered, result

    # -- helpers ----------------------------------------------------------------------

    def _combine(
        self, combiner: GradientCombiner, stats: TaskStats, *, has_jacobian: bool
    ) -> CombinerOutput:
        output = combiner.combine(stats)
        if output.direction is not None and not has_jacobian:
            raise ValueError(
                f"combiner {combiner.name!r} returned a direction without declaring Need.JACOBIAN"
            )
        return output

    def _backward_weighted(
        self, task_losses: Tensor, output: CombinerOutput, pullback: Callable | None = None
    ) -> tuple[list[Tensor], EngineResult]:
        """The gradient of Σ_i w_i ℓ_i: by autograd, or by ``pullback`` (the ``torch.func.vjp``
        of the task losses with respect to ``self.params``) under vmap over seeds."""
        assert output.weights is not None
        weights = weights_like(output.weights, task_losses)
        params = list(self.params.values())
        if pullback is not None:
            (by_name,) = pullback(weights)
            grads = [by_name[name] for name in self.params]
        else:
            grads = torch.autograd.grad((weights * task_losses).sum(), params, allow_unused=True)
        ordered = [
            torch.zeros_like(param) if grad is None else grad for param, grad in zip(params, grads)
        ]
        finite = torch.isfinite(task_losses).all() & all_finite(ordered)
        return ordered, EngineResult(
            losses=task_losses.detach(), output=output, gramian=None, finite=finite
        )
