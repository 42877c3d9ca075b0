"""The combiner library outside RL: two regression tasks sharing one linear model.

Task 2's inputs are 10x larger than task 1's, so its loss and gradient are
100x larger and with plain LS it dominates the shared weights; the two tasks
have related but different solutions, so one shared model trades them off.
Every method gets the same per-task gradients each step and ``combine`` turns
them into one update direction; steps are normalised so only directions differ.
Run:  python scripts/toy_regression.py
"""

from __future__ import annotations

import argparse

import torch

from mtrl_ntk.combiners import available_combiners, combine


def make_tasks(
    seed: int, dim: int = 20, samples: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [N, d], targets [N]) per task: a common solution plus a task-specific part."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=generator, dtype=torch.float64)
    tasks = []
    for scale in (1.0, 10.0):
        inputs = scale * torch.randn(samples, dim, generator=generator, dtype=torch.float64)
        own = torch.randn(dim, generator=generator, dtype=torch.float64)
        tasks.append((inputs, inputs @ (common + 0.3 * own)))
    return tasks


def train(name: str, steps: int, lr: float, seed: int) -> list[float]:
    """Normalised gradient descent on the shared weights; each task's final loss / initial loss."""
    tasks = make_tasks(seed)
    weights = torch.zeros(tasks[0][0].shape[1], dtype=torch.float64)  # shared by both tasks
    initial = [float((targets**2).mean()) for _, targets in tasks]
    for _ in range(steps):
        residuals = [inputs @ weights - targets for inputs, targets in tasks]
        losses = torch.stack([(r**2).mean() for r in residuals])  # [T]
        grads = torch.stack(  # [T, d]
            [2 * inputs.T @ r / len(r) for (inputs, _), r in zip(tasks, residuals)]
        )
        direction = combine(name, grads, losses=losses)
        weights = weights - lr * direction / direction.norm().clamp_min(1e-12)
        lr *= 0.98
    return [
        float(((inputs @ weights - targets) ** 2).mean()) / start
        for (inputs, targets), start in zip(tasks, initial)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=available_combiners())
    args = parser.parse_args()
    print(f"{'method':<12} {'task 1':>8} {'task 2':>8}   (final loss / initial loss)")
    for name in args.methods:
        small, large = train(name, args.steps, args.lr, args.seed)
        print(f"{name:<12} {small:>8.4f} {large:>8.4f}")


if __name__ == "__main__":
    main()
