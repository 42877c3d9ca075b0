"""Time one gradient update per combiner at MT10 shape, against plain LS and the research code.

Networks (multi-task SAC as in docs/design.md, task conditioning by one-hot):
  critic: twin Q, each a 3x400 ReLU MLP on [obs 39, task one-hot T, action 4] -> 1;
  actor:  a 3x400 ReLU MLP on [obs 39, task one-hot T] -> 2 x 4 (tanh-Gaussian mean, log-std).
Batch: T = 10 tasks x 128 samples (1280), grouped [T, B_t, ...] as the replay buffer samples it.

Rows (each the sum of one critic and one actor update; median over repeats after warm-up,
timed round-robin across rows so load drift on a shared machine hits all rows alike):
  ls_backward    one backward of the mean loss (plain multi-task SAC): the baseline;
  per_task_loop  the research code's T ``torch.autograd.grad`` calls after one forward;
  jacobian_n1/4  the engine's per-task Jacobian (one vmapped pass), n = 1 and 4 mini-batches;
  <combiner>     every registered combiner end to end through the engine
                 (``engine.backward`` + ``engine.after_step``), default hyperparameters;
  ntkmtl_n4      NTKMTL with n = 4 mini-batches per task.

  python scripts/bench_combiners.py                 # table, all cores
  python scripts/bench_combiners.py --threads 2 --json
  python scripts/bench_combiners.py --quick --json  # tiny shape, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtrl_ntk.combiners import available_combiners, make_combiner
from mtrl_ntk.engine import TaskGradientEngine, per_task_jacobian
from mtrl_ntk.runtime import tune_cpu_allocator

OBS_DIM, ACTION_DIM = 39, 4
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


@dataclass(frozen=True)
class Shape:
    num_tasks: int
    per_task: int
    hidden: int
    layers: int


FULL = Shape(num_tasks=10, per_task=128, hidden=400, layers=3)
QUICK = Shape(num_tasks=3, per_task=8, hidden=16, layers=2)


def mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    modules.append(nn.Linear(width, outputs))
    return nn.Sequential(*modules)


class TwinQ(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        inputs = OBS_DIM + shape.num_tasks + ACTION_DIM
        self.q1 = mlp(inputs, shape.hidden, shape.layers, 1)
        self.q2 = mlp(inputs, shape.hidden, shape.layers, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q1 [B], Q2 [B] and the last hidden layers of both, the shared representation [B, 2h]."""
        z = torch.cat([self.q1[:-1](x), self.q2[:-1](x)], dim=-1)  # [B, 2h]
        # The heads read z itself, so the losses are functions of the returned representation.
        z1, z2 = z.chunk(2, dim=-1)
        return self.q1[-1](z1).squeeze(-1), self.q2[-1](z2).squeeze(-1), z


class Actor(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.net = mlp(OBS_DIM + shape.num_tasks, shape.hidden, shape.layers, 2 * ACTION_DIM)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean [B, A], log-std [B, A] (squashed into its bounds) and the last hidden layer."""
        z = self.net[:-1](x)
        mean, log_std = self.net[-1](z).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std, z


def one_hot(task_ids: Tensor, num_tasks: int, dtype: torch.dtype) -> Tensor:
    # A comparison, not F.one_hot: vmap-compatible.
    return (task_ids.unsqueeze(-1) == torch.arange(num_tasks, device=task_ids.device)).to(dtype)


LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], tuple[Tensor, Tensor | None]]


def critic_loss_fn(critic: TwinQ, num_tasks: int) -> LossFn:
    def loss_fn(params: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        task = one_hot(batch["task_ids"], num_tasks, batch["obs"].dtype)
        x = torch.cat([batch["obs"], task, batch["action"]], dim=-1)
        q1, q2, z = functional_call(critic, params, (x,))
        target = batch["target_q"]  # precomputed r + γ (1 - d) V(s'), as SAC's no-grad target
        return (q1 - target) ** 2 + (q2 - target) ** 2, z  # [B], [B, 2h]

    return loss_fn


def actor_loss_fn(actor: Actor, critic: TwinQ, num_tasks: int, alpha: float = 0.1) -> LossFn:
    def loss_fn(params: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        task = one_hot(batch["task_ids"], num_tasks, batch["obs"].dtype)
        mean, log_std, z = functional_call(actor, params, (torch.cat([batch["obs"], task], -1),))
        std = log_std.exp()
        pre_tanh = mean + std * batch["noise"]  # reparameterised sample, noise pre-drawn
        action = torch.tanh(pre_tanh)
        log_prob = (
            -0.5 * batch["noise"] ** 2 - log_std - 0.5 * math.log(2 * math.pi)
            - torch.log1p(-action**2 + 1e-6)
        ).sum(-1)
        q1, q2, _ = critic(torch.cat([batch["obs"], task, action], -1))
        return alpha * log_prob - torch.minimum(q1, q2), z  # [B], [B, h]

    return loss_fn


def make_batch(shape: Shape, device: torch.device, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    t, b = shape.num_tasks, shape.per_task

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator).to(device)

    return {
        "task_ids": torch.arange(t).unsqueeze(1).expand(t, b).contiguous().to(device),
        "obs": randn(t, b, OBS_DIM),
        "action": torch.tanh(randn(t, b, ACTION_DIM)),
        "target_q": randn(t, b),
        "noise": randn(t, b, ACTION_DIM),
    }


def flat(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def interleaved_median_ms(
    runners: dict[tuple[str, str], Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[tuple[str, str], float]:
    """Median wall time [ms] of each runner, timed round-robin (one run of each per round).

    Interleaving spreads any drift of the machine's load (a shared CPU) over all
    rows alike, so the ratios stay meaningful even when the absolute times move.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for run in runners.values():
        for _ in range(warmup):
            run()
    synchronize()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            synchronize()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def benchmark(shape: Shape, device: torch.device, warmup: int, repeats: int) -> dict[str, dict]:
    torch.manual_seed(0)
    critic = TwinQ(shape).to(device)
    actor = Actor(shape).to(device)
    batch = make_batch(shape, device, seed=0)
    t, b = shape.num_tasks, shape.per_task
    networks = {
        "critic": (critic, critic_loss_fn(critic, t)),
        "actor": (actor, actor_loss_fn(actor, critic, t)),
    }

    def ls_backward(module: nn.Module, loss_fn: LossFn) -> Callable[[], None]:
        params = dict(module.named_parameters())

        def run() -> None:
            module.zero_grad(set_to_none=True)
            losses, _ = loss_fn(params, flat(batch))
            losses.mean().backward()

        return run

    def per_task_loop(module: nn.Module, loss_fn: LossFn) -> Callable[[], None]:
        params = dict(module.named_parameters())

        def run() -> None:
            losses, _ = loss_fn(params, flat(batch))
            task_losses = losses.view(t, b).mean(dim=1)  # [T]
            for i in range(t):
                torch.autograd.grad(task_losses[i], list(params.values()), retain_graph=i < t - 1)

        return run

    def engine_jacobian(module: nn.Module, loss_fn: LossFn, n: int) -> Callable[[], None]:
        params = {k: v.detach() for k, v in module.named_parameters()}

        def run() -> None:
            per_task_jacobian(loss_fn, params, {}, batch, num_minibatches=n)

        return run

    def through_engine(
        module: nn.Module, loss_fn: LossFn, name: str, **params: int
    ) -> Callable[[], None]:
        engine = TaskGradientEngine(module, num_tasks=t)
        combiner = make_combiner(name, t, **params)

        def run() -> None:
            engine.backward(loss_fn, batch, combiner)
            engine.after_step(loss_fn, batch, combiner)

        return run

    rows: dict[str, Callable[[nn.Module, LossFn], Callable[[], None]]] = {
        "ls_backward": ls_backward,
        "per_task_loop": per_task_loop,
        "jacobian_n1": lambda m, f: engine_jacobian(m, f, 1),
        "jacobian_n4": lambda m, f: engine_jacobian(m, f, 4),
    }
    for name in available_combiners():
        rows[name] = lambda m, f, name=name: through_engine(m, f, name)
    rows["ntkmtl_n4"] = lambda m, f: through_engine(m, f, "ntkmtl", num_minibatches=4)

    runners = {
        (row, network): build(module, loss_fn)
        for row, build in rows.items()
        for network, (module, loss_fn) in networks.items()
    }
    medians = interleaved_median_ms(runners, device, warmup, repeats)
    results: dict[str, dict] = {}
    for row in rows:
        critic_ms, actor_ms = medians[(row, "critic")], medians[(row, "actor")]
        results[row] = {"ms": critic_ms + actor_ms, "critic_ms": critic_ms, "actor_ms": actor_ms}
    baseline = results["ls_backward"]["ms"]
    for result in results.values():
        result["ratio_to_ls"] = result["ms"] / baseline
    return results


def print_table(results: dict[str, dict], header: str) -> None:
    print(header)
    print(f"{'row':<15} {'ms':>9} {'x LS':>6} {'critic ms':>10} {'actor ms':>9}")
    for row, r in results.items():
        print(
            f"{row:<15} {r['ms']:>9.2f} {r['ratio_to_ls']:>6.2f} "
            f"{r['critic_ms']:>10.2f} {r['actor_ms']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape (seconds), for tests")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (3; quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (15; quick: 2)")
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # as the trainer: no page faults for the Jacobian's large tensors
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 15)
    if warmup < 0 or repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    device = torch.device(args.device)
    results = benchmark(shape, device, warmup, repeats)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        device_name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}"
        )
        print_table(
            results,
            f"T={shape.num_tasks} batch={shape.num_tasks * shape.per_task} "
            f"{shape.layers}x{shape.hidden} on {device_name}, "
            f"{torch.get_num_threads()} threads, median of {repeats} after {warmup} warm-up",
        )


if __name__ == "__main__":
    main()
