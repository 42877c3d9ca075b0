"""The one place where the composed Hydra config becomes validated objects.

``run_mt10.py`` (the entry point) calls :func:`prepare_argv` on the raw command
line and :func:`build_run_spec` on the composed config; both raise
:class:`ConfigError` with one line that names the key, the valid values and the
closest match, *before* any environment process starts. The entry point prints
that line and exits with status 2, without a traceback.

Nothing here reads the config a second way: the trainer receives a
:class:`RunSpec` and builds the combiners with :func:`make_combiners`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtrl_ntk.agent import ARCHITECTURES, AgentConfig
from mtrl_ntk.combiners import GradientCombiner, available_combiners, combiner_class, make_combiner
from mtrl_ntk.combiners.base import Need
from mtrl_ntk.envs import BACKENDS, BENCHMARK_TASKS, PROTOCOLS, Protocol, serving_problem
from mtrl_ntk.errors import ConfigError

_TOP_LEVEL_KEYS = {
    "combiner", "env", "protocol", "agent", "seed", "seeds", "seed_group", "device", "name",
    "train", "resume", "debug",
}
_ENV_KEYS = {"benchmark", "vector_strategy", "backend", "seed_workers"}
_VECTOR_STRATEGIES = ("async", "sync")
_HYDRA_MODE_FLAGS = {
    "-m", "--multirun", "-r", "--run", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion",
}
_INTEGER_RANGE = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)=(?P<first>-?\d+)\.\.(?P<last>-?\d+)$")


def closest_match_hint(value: Any, valid: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _unknown_choice(what: str, value: Any, valid: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"unknown {what} {value!r}.{closest_match_hint(value, valid)} "
        f"Valid: {', '.join(valid)}"
    )


# ---------------------------------------------------------------------------------------------
# The command line, before Hydra composes anything
# ---------------------------------------------------------------------------------------------


def expand_integer_ranges(argv: Sequence[str]) -> list[str]:
    """Rewrite ``key=A..B`` (inclusive integer range) into Hydra's ``key=range(A,B+1)`` sweep,
    and ``seed=A..B`` into one job that trains those seeds side by side.

    ``seed=0..9`` as typed becomes ``seed=0 seeds=[0,...,9]``: one process, ten seeds
    (mtrl_ntk/trainer/), each written to its own ``seed<k>`` run directory. With
    ``seed_group=false`` on the command line it becomes a multirun over the ten seeds
    instead (one job per seed: SLURM arrays, or a launcher's parallel jobs), as every other
    key's range does: ``-m`` is added when a range became a sweep and no Hydra mode flag
    (``-m``, ``--cfg``, ``--info``, ...) is present. A range whose end is before its start
    is a ConfigError.
    """
    rewritten: list[str] = []
    expanded = False
    grouped = "seed_group=false" not in {argument.lower() for argument in argv}
    for argument in argv:
        match = _INTEGER_RANGE.match(argument)
        if match is None:
            rewritten.append(argument)
            continue
        first, last = int(match["first"]), int(match["last"])
        if last < first:
            raise ConfigError(
                f"empty range {argument!r}: {match['key']}=A..B needs A <= B (both ends included)"
            )
        if match["key"] == "seed" and grouped:
            seeds = ",".join(str(seed) for seed in range(first, last + 1))
            rewritten += [f"seed={first}", f"seeds=[{seeds}]"]
            continue
        rewritten.append(f"{match['key']}=range({first},{last + 1})")
        expanded = True
    # Hydra allows one mode flag: with --cfg, --info, ... the user asked for that mode instead.
    if expanded and not _HYDRA_MODE_FLAGS & set(rewritten):
        rewritten.insert(0, "-m")
    return rewritten


def check_group_choices(argv: Sequence[str], config_dir: Path) -> None:
    """Check ``group=choice`` overrides (also ``group=a,b`` sweeps) against ``configs/<group>/``.

    Hydra would report an unknown choice with its search path and no closest
    match; this gives the one-line message instead. Combiner names are checked
    against the registry, whose names are exactly the YAML files of
    ``configs/combiner/`` (a test keeps them equal).
    """
    groups = {path.name for path in config_dir.iterdir() if path.is_dir()}
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, value = argument.split("=", 1)
        key = key.lstrip("+")
        if key not in groups or "(" in value:  # sweep functions such as choice(...) pass through
            continue
        # Options in sub-folders are named by their path: experiment=table4/famo.
        options = sorted(
            path.relative_to(config_dir / key).with_suffix("").as_posix()
            for path in (config_dir / key).rglob("*.yaml")
        )
        for choice in value.split(","):
            choice = choice.strip()
            if choice in options:
                continue
            if key == "combiner":
                try:
                    combiner_class(choice)
                except ValueError as error:
                    raise ConfigError(str(error)) from None
            raise _unknown_choice(key, choice, options)


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(key, value) of every ``key=value`` argument that is not a flag."""
    return [
        tuple(argument.split("=", 1))  # type: ignore[misc]
        for argument in argv
        if not argument.startswith("-") and "=" in argument
    ]


def check_override_keys(argv: Sequence[str], config_dir: Path) -> None:
    """Check that every ``a.b=value`` override names an existing key of the composed config.

    Hydra's struct mode rejects unknown keys too, in a multi-line message without
    the key it probably meant; this gives one line with the closest existing key.
    The config is composed with the group choices of the command line; keys of a
    swept group (``combiner=a,b``), appended (``+``), deleted (``~``) and
    ``hydra.*`` keys are left to Hydra.
    """
    from hydra import compose, initialize_config_dir

    groups = {path.name for path in config_dir.iterdir() if path.is_dir()}
    choices, keys, swept_groups = [], [], set()
    for key, value in _overrides(argv):
        if key in groups:
            if "(" in value or "," in value:  # a sweep: its keys differ per choice; Hydra checks
                swept_groups.add(key)
            else:
                choices.append(f"{key}={value}")
        elif not key.startswith(("+", "~", "hydra.")) and "@" not in key and "/" not in key:
            keys.append(key)
    keys = [key for key in keys if key.split(".")[0] not in swept_groups]
    if not keys:
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=choices)
    except Exception:  # noqa: BLE001 - whatever fails here, Hydra reports it itself next
        return
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node:
            continue
        if isinstance(node, DictConfig):
            siblings = [f"{parent}.{name}" if parent else str(name) for name in node]
            raise ConfigError(
                f"unknown config key {key!r}.{closest_match_hint(key, siblings)} "
                f"Valid keys{' of ' + repr(parent) if parent else ''}: {', '.join(siblings)}"
            )
        raise ConfigError(f"unknown config key {key!r}: {parent!r} is not a config section")


def prepare_argv(argv: Sequence[str], config_dir: Path) -> list[str]:
    """The command line Hydra should see: ranges expanded, group choices and keys checked."""
    rewritten = expand_integer_ranges(argv)
    check_group_choices(rewritten, config_dir)
    check_override_keys(rewritten, config_dir)
    return rewritten


# ---------------------------------------------------------------------------------------------
# The composed config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """The loop's budget and cadence (``train.*``); steps count steps of all T envs."""

    num_steps: int
    batch_size: int  # transitions per update over all tasks
    warmup_steps: int
    buffer_capacity: int  # transitions over all tasks
    log_every: int
    progress_bar: bool
    # Speed (scripts/bench_train.py).
    overlap_env_step: bool = False  # update while the env workers simulate the step
    compile: bool = False  # the whole update as one compiled graph (CUDA graph on CUDA)
    # Reliability (mtrl_ntk/checkpoint.py, mtrl_ntk/faults.py).
    checkpoint_every: int = 0  # steps; 0: only on SIGTERM/SIGINT
    keep_checkpoints: int = 2
    check_finite: bool = True  # report skipped non-finite updates, stop on too many
    max_consecutive_skips: int = 10
    # mtrl's loop: warmup_steps updates at once when the warm-up ends (update_schedule.py).
    warmup_burst: bool = False


@dataclass(frozen=True)
class DebugSettings:
    """Test hooks that cause faults on purpose (``debug.*``; all off by default).

    They exist so the tests can exercise the fault paths of a real run end to end:
    ``nan_at_step``/``nan_steps``/``nan_task`` make that task's rewards in the sampled
    batch NaN (so its TD targets and critic loss are NaN) for ``nan_steps`` updates
    (of seed ``nan_seed`` only, when given);
    ``kill_at_step`` SIGKILLs the process at the end of that step (after its
    checkpoint, if any); ``kill_during_checkpoint`` SIGKILLs it halfway through
    writing the n-th checkpoint file of the session.
    """

    nan_at_step: int | None = None
    nan_steps: int = 1
    nan_task: str | None = None  # None: the first task
    nan_seed: int | None = None  # None: every seed of a group
    kill_at_step: int | None = None
    kill_during_checkpoint: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """Everything a run needs, validated. Built only by :func:`build_run_spec`."""

    seed: int
    device: torch.device
    benchmark: str
    task_names: tuple[str, ...]
    vector_strategy: str
    protocol: Protocol
    combiner_name: str
    combiner_params: dict[str, Any]
    agent: AgentConfig
    train: TrainSettings
    resume: bool = False  # continue the run directory from its last complete checkpoint
    debug: DebugSettings = DebugSettings()
    env_backend: str = "metaworld"  # env.backend: metaworld | envpool
    seed_workers: int | None = None  # env.seed_workers; None: auto (see seed_worker_count)

    def seed_worker_count(self, num_seeds: int, cores: int | None) -> int:
        """Worker processes for a group of ``num_seeds`` seeds' envs (0: the main process).

        auto: one per seed, up to the cores but one (the learner's); none with 2 cores or
        fewer, where a worker only competes with the learner for a core.
        """
        if self.seed_workers is not None:
            return min(self.seed_workers, num_seeds)
        cores = cores or 1
        return 0 if cores <= 2 else min(num_seeds, cores - 1)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def batch_per_task(self) -> int:
        return self.train.batch_size // self.num_tasks

    @property
    def capacity_per_task(self) -> int:
        return self.train.buffer_capacity // self.num_tasks


def _integer(section: DictConfig | dict, key: str, prefix: str, minimum: int) -> int:
    """An integer >= minimum; integral floats such as 1e6 are accepted."""
    value = section.get(key)
    integral_float = isinstance(value, float) and value.is_integer()
    if not (isinstance(value, int) and not isinstance(value, bool)) and not integral_float:
        raise ConfigError(f"{prefix}{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def seed_list(cfg: DictConfig) -> list[int] | None:
    """The ``seeds`` of a seed group (``seed=A..B``), checked; None for a single-seed run."""
    seeds = cfg.get("seeds")
    if seeds is None:
        return None
    values = list(seeds) if isinstance(seeds, (list, ListConfig)) else None
    if not values or any(
        isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 for seed in values
    ) or len(set(values)) != len(values):
        raise ConfigError(
            f"seeds must be a non-empty list of distinct integers >= 0 (seed=A..B), got {seeds!r}"
        )
    if not _boolean(cfg, "seed_group", ""):
        raise ConfigError(
            "seeds=[...] trains the seeds in one process, which seed_group=false turns off; "
            "use seed=A..B seed_group=false for one job per seed"
        )
    return [int(seed) for seed in values]


def _optional_integer(
    section: DictConfig | dict, key: str, prefix: str, minimum: int
) -> int | None:
    return None if section.get(key) is None else _integer(section, key, prefix, minimum)


def _debug(node: DictConfig | None, task_names: Sequence[str]) -> DebugSettings:
    if node is None:
        return DebugSettings()
    _check_known_keys(node, "debug.", {field.name for field in dataclasses.fields(DebugSettings)})
    nan_task = node.get("nan_task")
    if nan_task is not None and nan_task not in task_names:
        raise _unknown_choice("debug.nan_task", nan_task, list(task_names))
    return DebugSettings(
        nan_at_step=_optional_integer(node, "nan_at_step", "debug.", 1),
        nan_steps=_integer(node, "nan_steps", "debug.", 1) if "nan_steps" in node else 1,
        nan_task=nan_task,
        nan_seed=_optional_integer(node, "nan_seed", "debug.", 0),
        kill_at_step=_optional_integer(node, "kill_at_step", "debug.", 1),
        kill_during_checkpoint=_optional_integer(node, "kill_during_checkpoint", "debug.", 1),
    )


def _boolean(section: DictConfig | dict, key: str, prefix: str) -> bool:
    value = section.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key} must be true or false, got {value!r}")
    return value


def resolve_device(name: Any) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>``."""
    valid = ("auto", "cpu", "cuda", "cuda:<index>")
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise _unknown_choice("device", name, valid)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def _protocol(node: DictConfig) -> Protocol:
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    name = values.pop("name", None)
    if name not in PROTOCOLS:
        raise _unknown_choice("protocol", name, sorted(PROTOCOLS))
    fields = {field.name for field in dataclasses.fields(Protocol)} - {"name"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown protocol field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    for key in ("max_episode_steps", "num_goals", "eval_every_steps", "eval_episodes_per_task"):
        if key in values:
            values[key] = _integer(values, key, "protocol.", 1)
    try:
        return dataclasses.replace(PROTOCOLS[name], **values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid protocol settings: {error}") from None


def _agent(node: DictConfig) -> AgentConfig:
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    arch = values.get("arch")
    if arch not in ARCHITECTURES:
        raise _unknown_choice("agent.arch", arch, list(ARCHITECTURES))
    fields = {field.name for field in dataclasses.fields(AgentConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown agent setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return AgentConfig(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid agent settings: {error}") from None


_TRAIN_KEYS = {field.name for field in dataclasses.fields(TrainSettings)}


def _check_known_keys(node: DictConfig, prefix: str, known: set[str]) -> None:
    """Keys appended with ``+key=value`` bypass Hydra's struct mode; nothing may be ignored."""
    unknown = sorted(set(map(str, node)) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + key for key in unknown)}; "
            f"valid: {', '.join(prefix + key for key in sorted(known))}"
        )


def build_run_spec(cfg: DictConfig) -> RunSpec:
    """Validate the composed config and return the objects a run needs.

    Fails with a one-line :class:`ConfigError` on an unknown combiner, combiner
    parameter or parameter value (the combiner is built once to validate it), an
    unknown architecture, protocol, benchmark or device, a batch size that does
    not split evenly over the tasks or the combiner's mini-batches, and
    non-positive step counts. Unknown top-level keys never get here: Hydra's
    struct mode rejects them while composing.
    """
    _check_known_keys(cfg, "", _TOP_LEVEL_KEYS)
    _check_known_keys(cfg.env, "env.", _ENV_KEYS)
    _check_known_keys(cfg.train, "train.", _TRAIN_KEYS)
    benchmark = cfg.env.benchmark
    if benchmark not in BENCHMARK_TASKS:
        raise _unknown_choice("env.benchmark", benchmark, sorted(BENCHMARK_TASKS))
    task_names = tuple(BENCHMARK_TASKS[benchmark])
    num_tasks = len(task_names)
    vector_strategy = cfg.env.vector_strategy
    if vector_strategy not in _VECTOR_STRATEGIES:
        raise _unknown_choice("env.vector_strategy", vector_strategy, _VECTOR_STRATEGIES)
    env_backend = cfg.env.get("backend", "metaworld")
    if env_backend not in BACKENDS:
        raise _unknown_choice("env.backend", env_backend, BACKENDS)
    seed_workers = cfg.env.get("seed_workers", "auto")
    if seed_workers != "auto" and (
        isinstance(seed_workers, bool) or not isinstance(seed_workers, int) or seed_workers < 0
    ):
        raise ConfigError(
            f"env.seed_workers must be auto or an integer >= 0, got {seed_workers!r}"
        )

    combiner_values = OmegaConf.to_container(cfg.combiner, resolve=True)
    assert isinstance(combiner_values, dict)
    combiner_name = combiner_values.pop("name", None)
    if combiner_name not in available_combiners():
        raise _unknown_choice("combiner", combiner_name, available_combiners())
    try:
        combiner = make_combiner(combiner_name, num_tasks, **combiner_values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"combiner {combiner_name!r}: {error}") from None

    train_node = cfg.train
    train = TrainSettings(
        num_steps=_integer(train_node, "num_steps", "train.", 1),
        batch_size=_integer(train_node, "batch_size", "train.", 1),
        warmup_steps=_integer(train_node, "warmup_steps", "train.", 0),
        buffer_capacity=_integer(train_node, "buffer_capacity", "train.", 1),
        log_every=_integer(train_node, "log_every", "train.", 1),
        progress_bar=_boolean(train_node, "progress_bar", "train."),
        overlap_env_step=_boolean(train_node, "overlap_env_step", "train."),
        compile=_boolean(train_node, "compile", "train."),
        checkpoint_every=_integer(train_node, "checkpoint_every", "train.", 0),
        keep_checkpoints=_integer(train_node, "keep_checkpoints", "train.", 1),
        check_finite=_boolean(train_node, "check_finite", "train."),
        max_consecutive_skips=_integer(train_node, "max_consecutive_skips", "train.", 1),
        # Absent from the config.yaml of runs made before the option: off.
        warmup_burst="warmup_burst" in train_node
        and _boolean(train_node, "warmup_burst", "train."),
    )
    if train.batch_size % num_tasks:
        below = train.batch_size // num_tasks * num_tasks
        nearest = " or ".join(str(size) for size in (below, below + num_tasks) if size > 0)
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by the {num_tasks} tasks of "
            f"{benchmark} (every task gets the same number of samples); use e.g. {nearest}"
        )
    batch_per_task = train.batch_size // num_tasks
    if batch_per_task % combiner.num_minibatches:
        raise ConfigError(
            f"train.batch_size={train.batch_size} gives {batch_per_task} samples per task, which "
            f"{combiner_name} cannot split into num_minibatches={combiner.num_minibatches} "
            "equal mini-batches"
        )
    if train.buffer_capacity // num_tasks < batch_per_task:
        raise ConfigError(
            f"train.buffer_capacity={train.buffer_capacity} holds fewer than the "
            f"{batch_per_task} samples per task of one batch"
        )

    agent = _agent(cfg.agent)
    if "alpha" in agent.balance and Need.REPRESENTATION_NTK in combiner.need:
        raise ConfigError(
            f"agent.balance includes alpha, but {combiner_name} needs a shared representation, "
            "which the temperature loss does not have; use e.g. agent.balance=[critic,actor]"
        )

    seed = _integer(cfg, "seed", "", 0)
    seed_list(cfg)  # checked here too, so that a group's config error comes before any work
    protocol = _protocol(cfg.protocol)
    problem = serving_problem(env_backend, protocol)
    if problem is not None:
        raise ConfigError(problem)
    return RunSpec(
        seed=seed,
        device=resolve_device(cfg.device),
        benchmark=benchmark,
        task_names=task_names,
        vector_strategy=vector_strategy,
        protocol=protocol,
        combiner_name=combiner_name,
        combiner_params=combiner_values,
        agent=agent,
        train=train,
        resume=_boolean(cfg, "resume", ""),
        debug=_debug(cfg.get("debug"), task_names),
        env_backend=env_backend,
        seed_workers=None if seed_workers == "auto" else seed_workers,
    )


def make_combiners(spec: RunSpec) -> tuple[GradientCombiner, GradientCombiner]:
    """Two independent instances (critic, actor) of the configured combiner, each with its state."""
    return tuple(  # type: ignore[return-value]
        make_combiner(spec.combiner_name, spec.num_tasks, **spec.combiner_params) for _ in range(2)
    )
