"""The training loop, written once for S >= 1 seeds (a single run is S = 1).

One step is one step of every seed's T environments (T transitions per seed into its
replay buffer) followed, after the random warm-up, by one SAC update per seed on a
batch of ``batch_size / T`` transitions per task (docs/design.md, "The data path");
with ``train.warmup_burst`` the step that ends the warm-up makes ``warmup_steps``
updates at once, as mtrl's loop does (``mtrl_ntk/update_schedule.py``):

1. act: each seed's warm-up actions from its own generator, then one policy call for
   all seeds ([S, T, D] -> [S, T, A], ``mtrl_ntk.trainer.learner``);
2. send every seed's actions (async workers simulate while the loop goes on);
3. with ``train.overlap_env_step``, the update now, else after 4;
4. collect every seed's step and store its transitions;
5. log, evaluate (all seeds together, one deterministic policy call per step) and
   checkpoint at their cadences; stop signals; the ``debug.kill_at_step`` hook.

Faults (mtrl_ntk/faults.py): a non-finite update is skipped and reported with the
step and the task; a seed whose updates stay non-finite (``train.max_consecutive_skips``
in a row) stops alone, its last good checkpoint and the reason (``result.json``) in
its run directory, while the other seeds carry on; the job then ends with
:class:`~mtrl_ntk.errors.NonFiniteUpdates`. SIGTERM/SIGINT/SIGUSR2 finish the step,
checkpoint every seed at the next episode end and stop with exit status 128 + signal;
a dead environment worker or a failed checkpoint write stop the run with one message
(:class:`~mtrl_ntk.errors.RunStopped`).

Hooks: observers (:class:`LoopObserver`) are told when each step starts and when
each phase starts and ends, so a benchmark (scripts/bench_train.py) times the loop
without patching it. A phase is one event for all seeds of the step.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from mtrl_ntk.envs import evaluate_together
from mtrl_ntk.errors import EnvWorkerError, NonFiniteUpdates, RunInterrupted, RunStopped
from mtrl_ntk.faults import StopSignals
from mtrl_ntk.trainer.learner import Learner, make_learner
from mtrl_ntk.trainer.metrics import add_per_seed
from mtrl_ntk.trainer.seed_run import SeedRun

PHASES = (
    "act", "env_send", "env_wait", "buffer_add", "sample", "guard", "update", "metrics", "log",
    "eval", "checkpoint",
)
"""The phases the loop reports to its observers, in the order of a step."""

_Result = TypeVar("_Result")


class LoopObserver(Protocol):
    """Told what the loop does (timing, tracing); it must not change the run."""

    def step_started(self, step: int) -> None:
        """Step ``step`` (1-based) starts: its actions are about to be chosen."""

    def phase_started(self, phase: str) -> None:
        """A phase of ``PHASES`` starts (for every seed of the step at once)."""

    def phase_ended(self, phase: str) -> None:
        """The phase that started last ends."""


class _Phase:
    """``with loop.phase(name):`` tells the observers, if there are any."""

    __slots__ = ("name", "observers")

    def __init__(self, observers: Sequence[LoopObserver], name: str) -> None:
        self.observers, self.name = observers, name

    def __enter__(self) -> None:
        for observer in self.observers:
            observer.phase_started(self.name)

    def __exit__(self, *exc_info: object) -> None:
        for observer in self.observers:
            observer.phase_ended(self.name)


class _Unobserved:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_UNOBSERVED = _Unobserved()


def progress_bar(runs: Sequence[SeedRun]) -> tqdm:
    """The loop's tqdm bar on stderr (disabled with ``train.progress_bar=false``)."""
    spec = runs[0].spec
    desc = spec.combiner_name
    if len(runs) > 1:
        desc += " seeds " + ",".join(str(run.spec.seed) for run in runs)
    return tqdm(
        total=spec.train.num_steps, initial=runs[0].step, unit="step", desc=desc,
        disable=not spec.train.progress_bar, file=sys.stderr, dynamic_ncols=True,
        # Time-based refresh only: tqdm's adaptive miniters, tuned on the fast warm-up,
        # would go quiet for minutes once the updates start.
        mininterval=1.0 if sys.stderr.isatty() else 30.0, miniters=1,
    )


class TrainingLoop:
    """Trains ``runs`` (S >= 1 seeds in lock step) for ``train.num_steps`` steps.

    Args:
        runs: the seeds' runs, built (``open_seed_runs``); all at the same step.
        resume_hint: the command that resumes the job (in stop messages).
        observers: told of every step and phase (module doc).
    """

    def __init__(
        self, runs: Sequence[SeedRun], resume_hint: str,
        observers: Sequence[LoopObserver] = (),
    ) -> None:
        if len({run.step for run in runs}) != 1:
            raise ValueError("the seeds of a loop must all be at the same step")
        self.runs = list(runs)
        self.spec = self.runs[0].spec
        self.resume_hint = resume_hint
        self.observers = list(observers)
        self.learner: Learner = make_learner(
            [run.agent for run in self.runs], compile=self.spec.train.compile
        )
        self.stopped: dict[int, dict[str, Any]] = {}  # seed -> its result.json, stopped for good
        self.step = self.runs[0].step  # steps done by every seed still training

    def phase(self, name: str) -> _Phase | _Unobserved:
        return _Phase(self.observers, name) if self.observers else _UNOBSERVED

    def run(self) -> dict[int, dict[str, Any]]:
        """Train every seed to ``train.num_steps``; returns each seed's result (also in its
        ``result.json``). Raises NonFiniteUpdates after the others finished when a seed
        stopped for non-finite updates."""
        train = self.spec.train
        progress = progress_bar(self.runs)
        stop = StopSignals()
        stop.install()
        results: dict[int, dict[str, Any]] = {}
        try:
            for run in self.runs:
                run.begin()
            while self.runs and self.step < train.num_steps:
                for observer in self.observers:
                    observer.step_started(self.step + 1)
                with self.phase("act"):
                    actions = self._actions()
                with self.phase("env_send"):
                    for run, seed_actions in zip(self.runs, actions, strict=True):
                        run.send_actions(seed_actions)
                self.step += 1
                if train.overlap_env_step:
                    self._update()
                with self.phase("env_wait"):
                    steps = [run.wait_step() for run in self.runs]
                with self.phase("buffer_add"):
                    for run, seed_actions, result in zip(self.runs, actions, steps, strict=True):
                        run.store_step(seed_actions, result)
                if not train.overlap_env_step:
                    self._update()
                progress.update(1)
                self._end_step(stop, progress)
            if self.runs:
                results = dict(zip(self._seeds(), self._each(SeedRun.finish), strict=True))
        except EnvWorkerError as error:  # a training or an evaluation env
            raise RunStopped(
                f"{error} (step {self.step}); resume from the last checkpoint with: "
                f"{self.resume_hint}"
            ) from error
        finally:
            stop.uninstall()
            progress.close()
        if self.stopped:
            reasons = [result["reason"] for result in self.stopped.values()]
            raise NonFiniteUpdates("; ".join(reasons))
        return results

    def _seeds(self) -> list[int]:
        return [run.spec.seed for run in self.runs]

    def _actions(self) -> list[np.ndarray]:
        """[T, A] per seed: each seed's warm-up actions, then one policy call for all seeds."""
        if self.step < self.spec.train.warmup_steps:
            return [run.warmup_actions() for run in self.runs]
        observations = np.stack([run.observation for run in self.runs])  # [S, T, D]
        return list(self.learner.act(observations, deterministic=False))

    def _update(self) -> None:
        """Every seed's updates of this step, each as one for all seeds (one per step,
        or the warm-up burst); their metrics stay on the device."""
        for _ in range(self.runs[0].updates_due()):
            with self.phase("sample"):
                batches = [run.sample_batch() for run in self.runs]
            with self.phase("guard"):
                for run in self.runs:
                    run.note_update()
            with self.phase("update"):
                metrics = self.learner.update(batches)  # a skipped update's are 0, "finite" False
            with self.phase("metrics"):
                add_per_seed([run.log_window for run in self.runs], metrics)
                add_per_seed([run.eval_window for run in self.runs], metrics)

    def _end_step(self, stop: StopSignals, progress: tqdm) -> None:
        """Log, evaluate and checkpoint when due; stop after a stop signal's checkpoints."""
        if self.runs[0].log_due():
            with self.phase("log"):
                self._each(SeedRun.log)
        if self.runs and self.runs[0].evaluation_due():
            with self.phase("eval"):
                self._evaluate()
            if self.runs:
                progress.set_postfix(eval=f"{self.runs[0].last_eval['eval/success_mean']:.2f}")
        requested = stop.requested is not None
        ready = [run.checkpoint_ready(requested) for run in self.runs]
        if any(ready):
            with self.phase("checkpoint"):
                paths = self._each(SeedRun.write_checkpoint, only=ready)
            if requested and paths and len(paths) == len(self.runs):
                self._stop(stop.requested, paths)
        if self.step == self.spec.debug.kill_at_step:  # test hook: die at the end of this step
            os.kill(os.getpid(), signal.SIGKILL)

    def _evaluate(self) -> None:
        """Every seed's evaluation, side by side: one deterministic policy call per step for
        all seeds (``evaluate_together``); then each seed writes its row."""
        evaluators = [run.ensure_evaluator() for run in self.runs]  # built once, kept open
        started = time.perf_counter()
        successes = evaluate_together(
            evaluators, lambda obs: self.learner.act(obs, deterministic=True)
        )
        seconds = time.perf_counter() - started
        by_run = dict(zip(map(id, self.runs), successes, strict=True))
        self._each(lambda run: run.record_evaluation(by_run[id(run)], seconds))

    def _stop(self, signal_number: int, paths: Sequence[Path]) -> None:
        """After a stop signal, once every seed wrote its checkpoint: stop the job."""
        if self.step >= self.spec.train.num_steps:
            return
        name = signal.Signals(signal_number).name
        if len(paths) == 1:
            written = f"checkpoint {paths[0].name} written"
        else:
            written = f"all {len(paths)} seeds of the group checkpointed ({paths[0].name})"
        raise RunInterrupted(
            f"interrupted by {name} at step {self.step}; {written}. "
            f"Resume with: {self.resume_hint}",
            signal_number,
        )

    def _each(
        self, phase: Callable[[SeedRun], _Result], only: Sequence[bool] | None = None
    ) -> list[_Result]:
        """``phase(run)`` for every seed (those ``only`` marks); a seed whose updates stayed
        non-finite stops there, alone (module doc), and is left out of the results."""
        results: list[_Result] = []
        for index, run in enumerate(list(self.runs)):
            if only is not None and not only[index]:
                continue
            try:
                results.append(phase(run))
            except NonFiniteUpdates as error:
                self._retire(run, str(error))
        return results

    def _retire(self, run: SeedRun, reason: str) -> None:
        index = self.runs.index(run)
        self.stopped[run.spec.seed] = run.stop(reason)
        self.runs.pop(index)
        if self.runs:  # the last seed's reason is the job's stop message
            self.learner = self.learner.without(index)
            seeds = ", ".join(str(seed) for seed in self._seeds())
            print(f"mtrl_ntk: {reason}; seeds {seeds} carry on", file=sys.stderr)

