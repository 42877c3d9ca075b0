"""Checkpoints: everything a bit-exact continuation of a run needs, written atomically.

Layout inside the run directory::

    checkpoints/
      step-000000010050.pt                      # one file per checkpoint; the last K are kept
      replay/rows-000000000000-000000010050.pt  # replay rows [start, stop), append-only

A checkpoint file holds a run's state as the trainer composes it (``SeedRun.state_dict``
in mtrl_ntk/trainer/seed_run.py: the agent with its combiners, the environment
state at an episode start, the generators, the step counter, the metric and
episode accumulators, the non-finite guard's counters; each part is the
``state_dict`` of the object that owns it) plus two entries of this module's own:
``format`` and a replay manifest, i.e. how many rows the buffer had received
(``rows_added``; one row = one transition per task) and which segment files hold
the rows still in the ring buffer. This module only writes and reads files: it
never imports the trainer and knows nothing of its state beyond it being a tree
of tensors and plain Python values (the step a file belongs to is in its name).

The replay buffer is saved incrementally: each checkpoint appends one segment with
the rows added since the previous checkpoint (at most the ring's capacity), never
the whole buffer again. Segments are deleted once no kept checkpoint needs them
(the ring buffer has overwritten them). On resume, segments beyond the loaded
checkpoint's ``rows_added`` (written for a checkpoint that never completed) are
deleted.

Sizes (measured; MT10, 1e6 transitions = 100k rows of 10 tasks): a paper-scale
state file is 16 MB, a full replay segment 336 MB and the segment of 10k steps
33.6 MB. With the default cadence and ``keep_checkpoints=2``, the segments on
disk span at most the ring plus the rows between the two kept checkpoints (about
1.2x the buffer, ~0.4 GB per run at full size).

Every file is written atomically: a temporary file in the same directory, fsync,
``os.replace``, fsync of the directory; a segment is durable before the checkpoint
that lists it. A kill at any moment therefore leaves the previous checkpoint
complete and loadable; a failed write (disk full) removes its temporary file,
leaves the previous checkpoint intact and stops the run with
:class:`CheckpointError`. A state holding a non-finite number in the entries the
caller names as learned state (``finite_keys``; by default all) is never written.

Episode boundaries: Meta-World cannot save the MuJoCo state of a running episode,
but training episodes never terminate early and share the horizon, so every task's
episode ends at the same step, every ``max_episode_steps`` steps. A checkpoint
requested at step s (every ``train.checkpoint_every`` steps, or by SIGTERM, SIGINT
or SIGUSR2) is written at the first step >= s where all episodes have just ended (classic
protocol: at most 149 steps later). There the environment's state is its goal
samplers' RNGs from *before* the reset that started the new episodes
(``MultiTaskEnv.episode_start_state_dict``), so a resumed run's ``reset()``
redraws the same goals and returns the observation the interrupted run saw.

Determinism: on CPU a resumed run reproduces the uninterrupted run bit for bit
(tests/trainer/test_resume.py). On CUDA, some backward kernels accumulate with
atomics in a nondeterministic order (e.g. the embedding gradient of the task
encoder, index_add/scatter), so a resumed GPU run continues from the identical
state but diverges at the floating-point rounding level, like two uninterrupted
GPU runs with the same seed.
"""

from __future__ import annotations

import io
import math
import re
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from mtrl_ntk.atomic import fsync_directory, write_atomically
from mtrl_ntk.errors import CheckpointError
from mtrl_ntk.replay import MultiTaskReplayBuffer

CHECKPOINT_DIR = "checkpoints"
REPLAY_DIR = "replay"
FORMAT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{12})\.pt$")
_SEGMENT_NAME = re.compile(r"^rows-(\d{12})-(\d{12})\.pt$")


def _step_of(path: Path) -> int:
    """The step of a checkpoint file, from its name (the state's layout is the caller's)."""
    match = _CHECKPOINT_NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path.name} is not a checkpoint file name")
    return int(match[1])


def _save_torch(obj: Any) -> Callable[[IO[bytes]], None]:
    """A writer of ``torch.save(obj)``, serialised in memory first: torch's zip writer turns
    a failed write (disk full) into a RuntimeError without the OSError behind it."""

    def write(handle: IO[bytes]) -> None:
        data = io.BytesIO()
        torch.save(obj, data)
        handle.write(data.getbuffer())

    return write


def _load_torch(path: Path, *, mmap: bool = False) -> Any:
    # weights_only: a checkpoint holds tensors and plain Python values, nothing executable.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


# -- validation ----------------------------------------------------------------------------------


def _tensor_leaves(tree: Any, path: str = "") -> list[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        return [(path, tree)]
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items()
                for leaf in _tensor_leaves(value, f"{path}.{key}" if path else str(key))]
    if isinstance(tree, (list, tuple)):
        return [leaf for index, value in enumerate(tree)
                for leaf in _tensor_leaves(value, f"{path}[{index}]")]
    return []


def non_finite_entries(tree: Any) -> list[str]:
    """Paths of the floating-point tensors and floats in ``tree`` holding a NaN or an infinity."""
    bad = [path for path, tensor in _tensor_leaves(tree)
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    return bad + [path for path, value in _float_leaves(tree) if not math.isfinite(value)]


def _float_leaves(tree: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(tree, float):
        return [(path, tree)]
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items()
                for leaf in _float_leaves(value, f"{path}.{key}" if path else str(key))]
    if isinstance(tree, (list, tuple)):
        return [leaf for index, value in enumerate(tree)
                for leaf in _float_leaves(value, f"{path}[{index}]")]
    return []


# -- the files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Replay rows [start, stop) in the order they were added (row i went to ring row i % C)."""

    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"rows-{self.start:012d}-{self.stop:012d}.pt"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint found on disk, loaded."""

    path: Path
    step: int
    state: dict[str, Any]  # the saved state plus "replay" (the manifest) and "format"


class CheckpointManager:
    """Writes, prunes and finds the checkpoints of one run directory.

    Args:
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
        keep: how many complete checkpoints to keep (the newest).
        kill_during: test hook: SIGKILL this process halfway through writing the
            ``kill_during``-th checkpoint file of this session.
    """

    def __init__(self, run_dir: Path, keep: int = 2, *, kill_during: int | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}; allowed: an integer >= 1")
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.replay_directory = self.directory / REPLAY_DIR
        self.keep = keep
        self.kill_during = kill_during
        self.saved_this_session = 0
        self.seconds_this_session = 0.0
        self._rows_covered = 0  # replay rows the newest checkpoint covers
        self._segments: list[Segment] = []  # the newest checkpoint's segments

    # -- listing -------------------------------------------------------------------------------

    def checkpoint_paths(self) -> list[Path]:
        """Complete checkpoint files (temporary files excluded), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _CHECKPOINT_NAME.match(p.name))

    def segments_on_disk(self) -> list[Segment]:
        if not self.replay_directory.is_dir():
            return []
        found = []
        for path in self.replay_directory.iterdir():
            match = _SEGMENT_NAME.match(path.name)
            if match:
                found.append(Segment(int(match[1]), int(match[2])))
        return sorted(found, key=lambda segment: segment.start)

    def _segment_path(self, segment: Segment) -> Path:
        return self.replay_directory / segment.name

    # -- writing -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: dict[str, Any],
        buffer: MultiTaskReplayBuffer,
        rows_added: int,
        *,
        finite_keys: Collection[str] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step``: first the new replay rows, then the state file.

        ``finite_keys`` names the top-level entries of ``state`` that must hold only
        finite numbers (None: all of them): a non-finite network or normaliser would
        poison every continuation, while a logged metric may legitimately be NaN.

        Raises CheckpointError (the previous checkpoint intact) when the state is not
        finite or a write fails.
        """
        checked = state if finite_keys is None else {key: state[key] for key in finite_keys}
        bad = non_finite_entries(checked)
        if bad:
            raise CheckpointError(
                f"refusing to checkpoint a non-finite state at step {step} "
                f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); "
                f"{self._previous_description()}"
            )
        capacity = buffer.capacity_per_task
        if buffer.size != min(rows_added, capacity):
            raise ValueError(
                f"the buffer holds {buffer.size} rows; {rows_added} added rows with capacity "
                f"{capacity} would leave {min(rows_added, capacity)}"
            )
        self.replay_directory.mkdir(parents=True, exist_ok=True)
        new = Segment(max(self._rows_covered, rows_added - capacity), rows_added)
        written: Path | None = None
        try:
            if new.stop > new.start:
                written = self._segment_path(new)
                write_atomically(written, _save_torch(_segment_rows(buffer, new)))
            segments = [s for s in self._segments if s.stop > rows_added - capacity]
            if new.stop > new.start:
                segments.append(new)
            manifest = {
                "rows_added": rows_added,
                "capacity_per_task": capacity,
                "segments": [[segment.start, segment.stop] for segment in segments],
            }
            path = self.directory / f"step-{step:012d}.pt"
            self.saved_this_session += 1
            write_atomically(
                path,
                _save_torch({**state, "format": FORMAT_VERSION, "replay": manifest}),
                kill_halfway=self.kill_during == self.saved_this_session,
            )
        except OSError as error:
            if written is not None:  # listed by no complete checkpoint
                written.unlink(missing_ok=True)
            raise CheckpointError(
                f"writing the checkpoint of step {step} failed ({error}); "
                f"{self._previous_description()}"
            ) from error
        self._rows_covered = rows_added
        self._segments = segments
        self._prune()
        return path

    def _previous_description(self) -> str:
        paths = self.checkpoint_paths()
        if not paths:
            return "there is no earlier checkpoint"
        return f"the previous checkpoint {paths[-1].name} is intact"

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints and the segments they need."""
        paths = self.checkpoint_paths()
        for path in paths[: -self.keep]:
            path.unlink(missing_ok=True)
        needed: set[Segment] = set(self._segments)
        for path in paths[-self.keep:][:-1]:  # older kept ones: read just their manifests
            try:
                manifest = _load_torch(path, mmap=True)["replay"]
            except Exception:  # noqa: BLE001 - unreadable: it needs nothing
                continue
            needed.update(Segment(start, stop) for start, stop in manifest["segments"])
        for segment in self.segments_on_disk():
            if segment not in needed:
                self._segment_path(segment).unlink(missing_ok=True)
        fsync_directory(self.replay_directory)
        fsync_directory(self.directory)

    # -- reading -------------------------------------------------------------------------------

    def latest(self, at_most: int | None = None) -> Checkpoint | None:
        """The newest checkpoint whose file and replay segments are complete and readable
        (of a step <= ``at_most``, if given: a seed group resumes all seeds at one step).

        Unreadable newer ones are reported on stderr and passed over.
        """
        for path in reversed(self.checkpoint_paths()):
            if at_most is not None and _step_of(path) > at_most:
                continue
            try:
                state = _load_torch(path)
                if state.get("format") != FORMAT_VERSION:
                    raise ValueError(f"format {state.get('format')!r}, expected {FORMAT_VERSION}")
                missing = [
                    Segment(start, stop).name for start, stop in state["replay"]["segments"]
                    if not self._segment_path(Segment(start, stop)).is_file()
                ]
                if missing:
                    raise FileNotFoundError(f"replay segment(s) {', '.join(missing)} missing")
            except Exception as error:  # noqa: BLE001 - any damage: fall back to an older one
                print(f"mtrl_ntk: warning: skipping checkpoint {path}: {error}", file=sys.stderr)
                continue
            return Checkpoint(path=path, step=_step_of(path), state=state)
        return None

    def resume_from(self, checkpoint: Checkpoint | None) -> None:
        """Continue writing after ``checkpoint`` (None: from scratch): delete temporary files,
        checkpoints newer than it (unreadable ones) and segments written after it."""
        rows = 0 if checkpoint is None else int(checkpoint.state["replay"]["rows_added"])
        for directory in (self.directory, self.replay_directory):
            if directory.is_dir():
                for path in directory.glob(".*.tmp"):
                    path.unlink(missing_ok=True)
        for path in self.checkpoint_paths():
            if checkpoint is None or path.name > checkpoint.path.name:
                path.unlink(missing_ok=True)
        for segment in self.segments_on_disk():
            if segment.stop > rows:
                self._segment_path(segment).unlink(missing_ok=True)
        self._rows_covered = rows
        self._segments = [] if checkpoint is None else [
            Segment(start, stop) for start, stop in checkpoint.state["replay"]["segments"]
        ]

    def restore_replay(self, checkpoint: Checkpoint, buffer: MultiTaskReplayBuffer) -> None:
        """Fill ``buffer`` with the rows ``checkpoint`` covers, at their ring positions."""
        manifest = checkpoint.state["replay"]
        rows_added, capacity = int(manifest["rows_added"]), buffer.capacity_per_task
        if manifest["capacity_per_task"] != capacity:
            raise CheckpointError(
                f"{checkpoint.path.name} has a replay capacity of {manifest['capacity_per_task']} "
                f"rows, this run's buffer {capacity}: resume with the same train.buffer_capacity"
            )
        size = min(rows_added, capacity)
        first = rows_added - size  # the oldest row still in the ring
        fields: dict[str, Tensor] = {}
        covered = first
        for start, stop in manifest["segments"]:
            if start > covered:
                break
            rows = _load_torch(self._segment_path(Segment(start, stop)), mmap=True)
            low, high = max(start, first), min(stop, rows_added)
            ring_rows = torch.arange(low, high) % capacity
            for name, values in rows.items():
                if name not in fields:
                    fields[name] = torch.zeros((size, *values.shape[1:]), dtype=values.dtype)
                fields[name][ring_rows] = values[low - start: high - start]
            covered = max(covered, high)
        if covered < rows_added:
            raise CheckpointError(
                f"{checkpoint.path.name}: replay rows [{covered}, {rows_added}) are in no segment"
            )
        if size:
            buffer.load_state_dict({
                **fields, "num_tasks": buffer.num_tasks, "capacity_per_task": capacity,
                "next_row": rows_added % capacity, "size": size,
            })


def _segment_rows(buffer: MultiTaskReplayBuffer, segment: Segment) -> dict[str, Tensor]:
    """The buffer's rows of ``segment`` in added order ([stop - start, T, ...] each)."""
    capacity = buffer.capacity_per_task
    start, stop = segment.start % capacity, (segment.stop - 1) % capacity + 1
    if start < stop:
        return buffer.rows(start, stop)
    tail, head = buffer.rows(start, capacity), buffer.rows(0, stop)  # wraps around the ring
    return {name: torch.cat([tail[name], head[name]]) for name in tail}
