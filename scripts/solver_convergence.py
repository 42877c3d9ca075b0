"""How many warm-started steps the iterative solvers need on Gramians recorded in training.

Records the critic's and the actor's task Gramians at every update of a real training
run (``run_mt10.py`` with the given overrides, by default ``experiment=smoke
combiner=nashmtl``; the combiners' ``combine`` is wrapped to copy its input, nothing
else changes), then replays them in order through Nash-MTL's and FairGrad's damped
Newton (``solvers.solve_power_balance``), each warm-started from its previous solution
as in training, and reports per Gramian the Newton steps until the relative residual is
at most ``--tolerance`` (1e-9, the property tests'), and the same for a cold start;
and the cyclic Jacobi sweeps (Aligned-MTL, IMTL-G) until the off-diagonal of the cosine
matrix's eigenpairs have residuals below 1e-12 of its largest entry.

    python scripts/solver_convergence.py                      # record (smoke run), measure
    python scripts/solver_convergence.py --gramians g.pt      # measure a recording again
    python scripts/solver_convergence.py --json --overrides experiment=smoke combiner=nashmtl
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run_mt10.py

import argparse
import json
import runpy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def record(overrides: list[str], run_dir: Path) -> dict[str, list[torch.Tensor]]:
    """The Gramians [T, T] (float64) the critic's and the actor's combiner saw, in order."""
    from mtrl_ntk.agent.sac import MultiTaskSAC
    from mtrl_ntk.combiners.base import GradientCombiner

    recorded: dict[str, list[torch.Tensor]] = {"critic": [], "actor": []}
    roles: dict[int, str] = {}
    build = MultiTaskSAC.__init__

    def build_and_label(self, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        roles[id(self.critic_combiner)] = "critic"
        roles[id(self.actor_combiner)] = "actor"

    depth = [0]  # a subclass's combine calling its base's is recorded once

    def wrap(cls: type) -> None:
        combine = cls.__dict__["combine"]

        def recording_combine(self, stats):
            role = roles.get(id(self))
            if depth[0] == 0 and role is not None and stats.gramian is not None:
                recorded[role].append(stats.gramian.detach().to(torch.float64).cpu().clone())
            depth[0] += 1
            try:
                return combine(self, stats)
            finally:
                depth[0] -= 1

        cls.combine = recording_combine

    MultiTaskSAC.__init__ = build_and_label
    for cls in {GradientCombiner, *_subclasses(GradientCombiner)}:
        if "combine" in cls.__dict__:
            wrap(cls)
    argv = sys.argv
    sys.argv = [str(ROOT / "run_mt10.py"), *overrides, f"hydra.run.dir={run_dir}"]
    try:
        runpy.run_path(str(ROOT / "run_mt10.py"), run_name="__main__")
    except SystemExit as exit_:  # hydra's main returns normally; a config error exits
        if exit_.code not in (0, None):
            raise
    finally:
        sys.argv = argv
    return recorded


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def newton_steps(gramians: list[torch.Tensor], power: float, tolerance: float) -> dict:
    """Steps to the tolerance per Gramian, warm (previous solution) and cold."""
    from mtrl_ntk.combiners import solvers

    histories: list[torch.Tensor] = []
    solve = solvers.solve_power_balance

    def keeping_history(*args, **kwargs):
        solution = solve(*args, **kwargs)
        histories.append(solution.history)
        return solution

    def steps(history: torch.Tensor) -> int:
        reached = (history <= tolerance).nonzero()
        return int(reached[0]) if len(reached) else len(history)  # not reached: budget + 1

    solvers.solve_power_balance = keeping_history
    try:
        warm, cold, start = [], [], None
        for gramian in gramians:
            weights, diagnostics = solvers.power_balance_weights(gramian, power, start)
            warm.append(steps(histories[-1]))
            if not bool(diagnostics["solver_fallback"]):
                start = weights
            solvers.power_balance_weights(gramian, power, None)
            cold.append(steps(histories[-1]))
    finally:
        solvers.solve_power_balance = solve
    return {"warm": summary(warm), "cold": summary(cold)}


def jacobi_sweeps_needed(gramians: list[torch.Tensor], limit: int = 10) -> dict:
    """Cyclic Jacobi sweeps (``solvers.jacobi_eigh``) until every eigenpair of the cosine
    matrix C has a residual max|C v - λ v| <= 1e-12 max|C| (float64 rounding: ~1e-15)."""
    from mtrl_ntk.combiners import solvers

    needed = []
    for gramian in gramians:
        cosines = solvers.scale_gramian(gramian).cosines
        scale = cosines.abs().amax()
        for sweeps in range(1, limit + 1):
            eigenvalues, vectors = solvers.jacobi_eigh(cosines, sweeps)
            residual = (cosines @ vectors - vectors * eigenvalues).abs().amax()
            if residual <= 1e-12 * scale:
                break
        needed.append(sweeps)
    return summary(needed)


def summary(counts: list[int]) -> dict:
    ordered = sorted(counts)
    return {
        "updates": len(counts),
        "median": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gramians", type=Path, default=None,
                        help="a recording to load, or where to save a new one")
    parser.add_argument("--overrides", nargs="*",
                        default=["experiment=smoke", "combiner=nashmtl", "device=cpu"],
                        help="run_mt10.py overrides of the recorded run")
    parser.add_argument("--tolerance", type=float, default=1e-9)
    parser.add_argument("--alpha", type=float, default=2.0, help="FairGrad's α (p = 1/α)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.gramians is not None and args.gramians.exists():
        recorded = torch.load(args.gramians)
    else:
        with tempfile.TemporaryDirectory() as run_dir:
            recorded = record(args.overrides, Path(run_dir))
        if not any(recorded.values()):
            parser.error("the run recorded no Gramian (is its combiner Gramian-based?)")
        if args.gramians is not None:
            torch.save(recorded, args.gramians)
    results = {}
    for role, gramians in recorded.items():
        if not gramians:
            continue
        # What the combiners solve (``solvers.gramian_of``): the symmetric part, float64.
        gramians = [0.5 * (gramian + gramian.T) for gramian in gramians]
        results[role] = {
            "nashmtl": newton_steps(gramians, 1.0, args.tolerance),
            f"fairgrad_alpha{args.alpha:g}": newton_steps(gramians, 1.0 / args.alpha,
                                                          args.tolerance),
            "jacobi_sweeps": jacobi_sweeps_needed(gramians),
        }
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"Gramians of {' '.join(args.overrides)}; Newton steps to a residual of "
          f"{args.tolerance:g} (median / p90 / max), Jacobi sweeps to eigenpair residuals of "
          "1e-12")
    for role, rows in results.items():
        for solver, counts in rows.items():
            for start, numbers in (counts.items() if "warm" in counts else [("cold", counts)]):
                print(f"{role:<7} {solver:<16} {start:<5} {numbers['updates']:>5} updates: "
                      f"{numbers['median']:>5} / {numbers['p90']:>3} / {numbers['max']:>3}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
