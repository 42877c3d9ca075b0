"""The Hydra configs agree with the code they configure, and bad settings fail fast and clearly.

Every test here composes configs in-process (no environment starts), so the file runs in
seconds; the end-to-end runs of ``run_mt10.py`` are in ``test_run_mt10.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtrl_ntk.agent import ARCHITECTURES, AgentConfig
from mtrl_ntk.combiners import available_combiners, combiner_params
from mtrl_ntk.config import (
    ConfigError,
    build_run_spec,
    check_group_choices,
    check_override_keys,
    expand_integer_ranges,
    make_combiners,
)
from mtrl_ntk.envs import BENCHMARK_TASKS, PROTOCOLS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# -- the YAML files mirror the registries -------------------------------------------------------


def test_there_is_one_combiner_yaml_per_registered_combiner() -> None:
    files = sorted(path.stem for path in (CONFIG_DIR / "combiner").glob("*.yaml"))
    assert files == available_combiners()
    assert len(files) == 17


@pytest.mark.parametrize("name", available_combiners())
def test_combiner_yaml_lists_exactly_the_registered_parameters_and_defaults(name: str) -> None:
    values = load_yaml(CONFIG_DIR / "combiner" / f"{name}.yaml")
    assert values.pop("name") == name
    assert values == combiner_params(name)


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_protocol_yaml_equals_the_protocol_preset(name: str) -> None:
    values = load_yaml(CONFIG_DIR / "protocol" / f"{name}.yaml")
    assert values == dataclasses.asdict(PROTOCOLS[name])


def test_protocol_yamls_are_exactly_the_presets() -> None:
    assert sorted(p.stem for p in (CONFIG_DIR / "protocol").glob("*.yaml")) == sorted(PROTOCOLS)


def test_agent_yaml_equals_the_agent_defaults() -> None:
    values = load_yaml(CONFIG_DIR / "agent" / "default.yaml")
    assert AgentConfig(**{**values, "balance": tuple(values["balance"])}) == AgentConfig()
    assert set(values) == {field.name for field in dataclasses.fields(AgentConfig)}


def test_there_is_one_env_yaml_per_benchmark_naming_it() -> None:
    paths = sorted((CONFIG_DIR / "env").glob("*.yaml"))
    assert [path.stem for path in paths] == sorted(BENCHMARK_TASKS)
    assert all(load_yaml(path)["benchmark"] == path.stem for path in paths)


# -- composed presets ---------------------------------------------------------------------------


def test_default_config_is_the_paper_scale_mt10_run() -> None:
    spec = build_run_spec(composed("device=cpu"))
    assert spec.combiner_name == "ls"
    assert spec.task_names == tuple(BENCHMARK_TASKS["mt10"])
    assert spec.protocol == PROTOCOLS["classic"]
    assert spec.agent == AgentConfig()
    assert (spec.train.num_steps, spec.train.batch_size, spec.train.warmup_steps) == (
        2_000_000, 1280, 1500,
    )
    assert (spec.batch_per_task, spec.capacity_per_task) == (128, 100_000)


def test_smoke_preset_evaluates_at_least_three_times_on_all_ten_tasks() -> None:
    spec = build_run_spec(composed("experiment=smoke", "combiner=ntkmtl"))
    assert spec.num_tasks == 10
    assert spec.train.num_steps // spec.protocol.eval_every_steps >= 3
    assert spec.train.warmup_steps < spec.protocol.eval_every_steps  # updates before eval 1
    assert spec.agent.hidden_dim <= 64


@pytest.mark.parametrize("name", available_combiners())
def test_every_combiner_builds_twice_with_independent_state(name: str) -> None:
    spec = build_run_spec(composed("experiment=smoke", f"combiner={name}"))
    critic, actor = make_combiners(spec)
    assert critic is not actor
    assert critic.name == actor.name == name


def test_run_directory_is_named_by_combiner_and_seed() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["combiner=ntkmtl", "seed=7"], return_hydra_config=True
        )
        run_dir = cfg.hydra.run.dir
    assert run_dir.endswith("mt10-classic-task_encoder/ntkmtl/seed7")


# -- the command line ----------------------------------------------------------------------------


def test_seed_range_becomes_one_job_of_every_seed_of_the_range() -> None:
    assert expand_integer_ranges(["combiner=ntkmtl", "seed=0..9"]) == [
        "combiner=ntkmtl", "seed=0", "seeds=[0,1,2,3,4,5,6,7,8,9]",
    ]
    assert expand_integer_ranges(["seed=3..5"]) == ["seed=3", "seeds=[3,4,5]"]
    # With other swept keys (a typed -m) each job of the sweep trains the whole group.
    assert expand_integer_ranges(["-m", "combiner=ls,ntkmtl", "seed=0..1"]) == [
        "-m", "combiner=ls,ntkmtl", "seed=0", "seeds=[0,1]",
    ]


def test_seed_range_without_seed_group_is_a_multirun_over_every_seed() -> None:
    assert expand_integer_ranges(["seed_group=false", "seed=0..2"]) == [
        "-m", "seed_group=false", "seed=range(0,3)",
    ]
    assert expand_integer_ranges(["seed=3..5", "seed_group=False"]) == [
        "-m", "seed=range(3,6)", "seed_group=False",
    ]


def test_range_rewrite_keeps_an_explicit_multirun_flag_and_other_arguments() -> None:
    assert expand_integer_ranges(["--multirun", "train.num_steps=1..2"]) == [
        "--multirun", "train.num_steps=range(1,3)",
    ]
    assert expand_integer_ranges(["seed=0..1", "--cfg", "job"]) == [
        "seed=0", "seeds=[0,1]", "--cfg", "job",
    ]
    assert expand_integer_ranges(["train.num_steps=1..2", "--cfg", "job"]) == [
        "train.num_steps=range(1,3)", "--cfg", "job",
    ]
    untouched = ["seed=3", "hydra.run.dir=../runs..x", "agent.actor_lr=1e-3", "name=a..b"]
    assert expand_integer_ranges(untouched) == untouched


def test_reversed_range_is_rejected() -> None:
    with pytest.raises(ConfigError, match="5..3"):
        expand_integer_ranges(["seed=5..3"])


def test_unknown_combiner_names_the_closest_match_and_every_valid_one() -> None:
    with pytest.raises(ConfigError) as error:
        check_group_choices(["combiner=ntkmlt"], CONFIG_DIR)
    message = str(error.value)
    assert "Did you mean 'ntkmtl'?" in message
    assert all(name in message for name in available_combiners())
    assert "\n" not in message


def test_unknown_choice_inside_a_sweep_list_is_found() -> None:
    with pytest.raises(ConfigError, match="'pcgard'.*Did you mean 'pcgrad'"):
        check_group_choices(["-m", "combiner=ls,pcgard"], CONFIG_DIR)


def test_unknown_protocol_choice_names_the_presets() -> None:
    with pytest.raises(ConfigError, match="unknown protocol 'mwplsu'.*'mwplus'.*classic, mwplus"):
        check_group_choices(["protocol=mwplsu"], CONFIG_DIR)


def test_valid_choices_pass() -> None:
    check_group_choices(
        ["combiner=ntkmtl,nashmtl", "+experiment=smoke", "protocol=mwplus", "seed=1"], CONFIG_DIR
    )


# -- validation of the composed config ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["agent.arch=task_encodr"], r"unknown agent.arch 'task_encodr'.*'task_encoder'"),
        (["train.batch_size=1285"], r"train.batch_size=1285 is not divisible by the 10 tasks"),
        (["combiner=cagrad", "combiner.c=-1"], r"combiner 'cagrad'.*'c'"),
        (["combiner=aligned_mtl", "combiner.scale_mode=max"], r"'scale_mode'"),
        (["combiner=ntkmtl_sr", "train.batch_size=1300"], r"130 samples.*num_minibatches=4"),
        (["+combiner.p=0.5", "combiner=ntkmtl"], r"unknown parameter.*'p'.*exponent"),
        (["train.num_steps=0"], r"train.num_steps must be an integer >= 1, got 0"),
        (["train.warmup_steps=-1"], r"train.warmup_steps must be an integer >= 0"),
        (["device=tpu"], r"unknown device 'tpu'"),
        (["protocol.name=mwplsu"], r"unknown protocol 'mwplsu'.*'mwplus'"),
        (["env.benchmark=mt11"], r"unknown env.benchmark 'mt11'.*'mt10'"),
        (["env.vector_strategy=threads"], r"unknown env.vector_strategy 'threads'"),
        (["protocol.max_episode_steps=501"], r"max_episode_steps"),
        (["agent.gamma=1.5"], r"gamma"),
        (["agent.balance=[critic,actor,alpha]", "combiner=ntkmtl_sr"],
         r"agent.balance includes alpha, but ntkmtl_sr needs a shared representation"),
        (["agent.balance=[critic,temperature]"], r"balance"),
        (["seeds=[0,0]"], r"seeds must be a non-empty list of distinct integers"),
        (["seeds=[]"], r"seeds must be a non-empty list"),
        (["seeds=[1,-2]"], r"seeds must be .* >= 0"),
        (["seeds=[0,1]", "seed_group=false"], r"seed_group=false"),
        (["env.seed_workers=-1"], r"env.seed_workers must be auto or an integer >= 0, got -1"),
        (["env.seed_workers=many"], r"env.seed_workers must be auto or an integer"),
    ],
)
def test_invalid_settings_raise_one_line_naming_the_key(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        build_run_spec(composed("device=cpu", *overrides))
    assert "\n" not in str(error.value)


def test_seed_workers_auto_leaves_a_core_to_the_learner() -> None:
    spec = build_run_spec(composed("device=cpu"))
    assert spec.seed_workers is None  # auto
    assert [spec.seed_worker_count(10, cores) for cores in (1, 2, 4, 16)] == [0, 0, 3, 10]
    assert spec.seed_worker_count(2, 16) == 2  # never more workers than seeds
    fixed = build_run_spec(composed("device=cpu", "env.seed_workers=4"))
    assert fixed.seed_worker_count(10, 2) == 4 and fixed.seed_worker_count(3, 2) == 3


def test_architectures_all_validate() -> None:
    for arch in ARCHITECTURES:
        assert build_run_spec(composed("device=cpu", f"agent.arch={arch}")).agent.arch == arch


def test_integral_float_counts_are_accepted() -> None:
    spec = build_run_spec(composed("device=cpu", "train.buffer_capacity=1e6"))
    assert spec.train.buffer_capacity == 1_000_000


def test_misspelt_key_names_the_closest_existing_key_of_its_section() -> None:
    with pytest.raises(ConfigError, match=r"'agent.hiden_dim'. Did you mean 'agent.hidden_dim'"):
        check_override_keys(["agent.hiden_dim=64"], CONFIG_DIR)
    with pytest.raises(ConfigError, match=r"'combiner.cc'. Did you mean 'combiner.c'"):
        check_override_keys(["combiner=cagrad", "combiner.cc=1"], CONFIG_DIR)


def test_keys_are_checked_against_the_chosen_groups() -> None:
    check_override_keys(
        ["combiner=cagrad", "combiner.c=0.1", "experiment=smoke", "train.num_steps=5"], CONFIG_DIR
    )
    check_override_keys(["-m", "combiner=cagrad,ls", "combiner.c=0.1"], CONFIG_DIR)  # Hydra's job
    check_override_keys(["hydra.run.dir=/tmp/x", "+extra=1", "hydra/launcher=joblib"], CONFIG_DIR)


def test_appended_unknown_keys_are_rejected_too() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) extra"):
        build_run_spec(composed("device=cpu", "+extra=1"))
    with pytest.raises(ConfigError, match=r"train.lr"):
        build_run_spec(composed("device=cpu", "+train.lr=1"))
