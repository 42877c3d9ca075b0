"""Every Table-4 preset resolves to the setting its authors ran (configs/experiment/table4/).

The table below is written from the authors' commands, not from the YAML files: the MT10
lines of ``mtrl_files/run.sh`` in Cranial-XIX/FAMO and OptMN-Lab/fairgrad, the Meta-World
commands of mtrl's ``docs_src/source/pages/tutorials/baseline.rst``, and the agent YAMLs
those commands select (``*_state_sac.yaml``). Flags map as follows:
``should_use_task_encoder=False`` -> ``arch=obs_only`` (mtrl then feeds env_obs only),
``should_use_task_encoder=True`` -> ``task_encoder``, ``should_use_multi_head_policy=True``
-> ``multihead``, ``should_use_disentangled_alpha`` -> ``disentangled_alpha``.
Real Hydra composition, no environment starts.
"""

from __future__ import annotations

import re

import pytest

from mtrl_ntk.config import ConfigError, build_run_spec, check_group_choices
from mtrl_ntk.envs import BENCHMARK_TASKS, PROTOCOLS
from mtrl_ntk.report import PUBLISHED_TABLE_4, published_row
from tests.trainer.test_configs import CONFIG_DIR, composed

ROOT = CONFIG_DIR.parent

# row: (arch, one temperature per task, combiner, combiner parameters that differ from
# the package defaults, the published Table-4 row or None).
AUTHORS = {
    # mtrl baseline.rst "Multi-task SAC": should_use_disentangled_alpha=True, no task encoder.
    "mtsac": ("obs_only", True, "ls", {}, "MTL SAC"),
    # mtrl's MT-SAC + should_use_task_encoder=True (metaworld_multitask.yaml actor_cfg).
    "mtsac_te": ("task_encoder", True, "ls", {}, "MTL SAC + TE"),
    # mtrl baseline.rst "Multi-task Multi-headed SAC": multi-head, disentangled alpha.
    "mhsac": ("multihead", True, "ls", {}, "MH SAC"),
    # One SAC per task: each its own temperature.
    "stl": ("independent", True, "ls", {}, "STL"),
    # mtrl baseline.rst "PCGrad": disentangled_alpha=False, should_use_task_encoder=False.
    "pcgrad": ("obs_only", False, "pcgrad", {}, "PCGrad"),
    # CAGrad's own MT10 command (Cranial-XIX/CAGrad mtrl/mtrl_files/run.sh): cagrad_c=0.9,
    # cagrad_method=cagrad (the inner-SGD solver of mtrl_files/cagrad.py), FAMO's flags.
    "cagrad": ("obs_only", False, "cagrad", {"c": 0.9, "solver": "sgd"}, "CAGrad"),
    # FAMO mtrl_files/nashmtl_state_sac.yaml (no parameter); FAMO run.sh flags.
    "nashmtl": ("obs_only", False, "nashmtl", {}, "Nash-MTL"),
    # FAMO run.sh: gamma=0.01 wlr=0.025, disentangled_alpha=False, no task encoder.
    "famo": ("obs_only", False, "famo", {"gamma": 0.01, "w_lr": 0.025}, "FAMO"),
    # FairGrad run.sh: fairgrad_alpha=2.0, disentangled_alpha=False, no task encoder; the
    # solver of its mtrl_files/fairgrad.py (the active SGD branch).
    "fairgrad": ("obs_only", False, "fairgrad", {"alpha": 2.0, "solver": "sgd"}, "FairGrad"),
    # No authors' MT10 command: the NTKMTL code base's (FairGrad's) flags.
    "moco": ("obs_only", False, "moco", {}, "MoCo"),
    "aligned_mtl": ("obs_only", False, "aligned_mtl", {}, "Aligned-MTL"),
    "ntkmtl": ("obs_only", False, "ntkmtl", {}, "NTKMTL"),
    # Not rows of the published table, presets all the same.
    "ntkmtl_sr": ("obs_only", False, "ntkmtl_sr", {}, None),
    "uw": ("obs_only", False, "uw", {}, None),
}
# The rows whose authors' agents are mtrl grad_manipulation agents (mtrl pcgrad.py; CAGrad's
# cagrad.py, FAMO's nashmtl.py, FairGrad's fairgrad.py): their SAC update calls the method's
# _compute_gradient for the critic, the actor and the temperature (log_alpha) losses. The
# other rows average the temperature (mtrl's plain SAC; FAMO's famo.py and uw.py balance
# positive losses only).
TEMPERATURE_THROUGH_THE_METHOD = {"pcgrad", "cagrad", "nashmtl", "fairgrad"}

# What every command shares (mtrl MT10: num_train_steps=2000000, batch_size=1280,
# num_eval_episodes=1, init_steps=1500, replay capacity 1e6, 3x400 nets).
COMMON = {
    ("train", "num_steps"): 2_000_000,
    ("train", "batch_size"): 1280,
    ("train", "warmup_steps"): 1500,
    # mtrl/experiment/multitask.py: num_updates = init_steps if step == init_steps else 1.
    ("train", "warmup_burst"): True,
    ("train", "buffer_capacity"): 1_000_000,
    # eval_freq=10000 checked only at 150-step episode ends: every 30000 steps.
    ("protocol", "eval_every_steps"): 30_000,
    ("protocol", "eval_episodes_per_task"): 1,
    ("agent", "hidden_dim"): 400,
    ("agent", "num_layers"): 3,
    ("agent", "head_layers"): 1,
    ("agent", "actor_lr"): 3e-4,
    ("agent", "critic_lr"): 3e-4,
    ("agent", "alpha_lr"): 3e-4,
    ("agent", "gamma"): 0.99,
    ("agent", "tau"): 0.005,
    ("agent", "init_temperature"): 1.0,
    ("agent", "task_embedding_dim"): 50,
}


# Rows whose network differs from the common 3x400 MLP with a linear output layer.
NETWORK = {
    # mtrl's multi-head actor/critic: build_mlp(num_layers=3) trunk whose 400->400 output
    # layer is followed by a ReLU (4 shared ReLU layers), then per-task 2-layer heads.
    "mhsac": {("agent", "num_layers"): 4, ("agent", "head_layers"): 2},
}


def preset_files() -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "experiment" / "table4").glob("*.yaml"))


def test_the_table_above_covers_every_preset() -> None:
    assert preset_files() == sorted(AUTHORS)


@pytest.mark.parametrize("row", sorted(AUTHORS))
def test_each_row_resolves_to_its_authors_setting(row: str) -> None:
    arch, per_task_alpha, combiner, params, published = AUTHORS[row]
    cfg = composed(f"experiment=table4/{row}", "device=cpu")
    # The choices are in the resolved config itself (what the run saves as config.yaml).
    assert cfg.agent.arch == arch
    assert cfg.agent.disentangled_alpha is per_task_alpha
    assert cfg.name == f"table4-{row}"
    spec = build_run_spec(cfg)
    assert spec.combiner_name == combiner
    assert spec.agent.arch == arch and spec.agent.disentangled_alpha is per_task_alpha
    assert spec.task_names == tuple(BENCHMARK_TASKS["mt10"])
    assert spec.protocol.name == "classic"
    assert spec.protocol.max_episode_steps == PROTOCOLS["classic"].max_episode_steps
    for (section, key), value in {**COMMON, **NETWORK.get(row, {})}.items():
        assert getattr(getattr(spec, section), key) == value, (section, key)
    expected_balance = ("critic", "actor", "alpha") if row in TEMPERATURE_THROUGH_THE_METHOD else (
        "critic", "actor")
    assert spec.agent.balance == expected_balance
    defaults = {key: value for key, value in cfg.combiner.items() if key != "name"}
    default_cfg = composed(f"combiner={combiner}").combiner
    changed = {key: value for key, value in defaults.items() if default_cfg[key] != value}
    assert changed == params
    assert published_row(combiner, arch) == published


def test_the_launch_script_runs_the_twelve_published_rows() -> None:
    script = (ROOT / "scripts" / "table4.sh").read_text()
    rows = re.search(r'TABLE4_ROWS="([^"]+)"', script).group(1).split()
    assert len(rows) == 12 and set(rows) <= set(AUTHORS)
    assert sorted(AUTHORS[row][4] for row in rows) == sorted(PUBLISHED_TABLE_4)
    assert 'run_mt10.py -m "experiment=table4/$row" "seed=$SEEDS"' in script


def test_row_choices_are_checked_before_hydra_with_a_hint() -> None:
    check_group_choices(["experiment=table4/famo", "seed=0"], CONFIG_DIR)
    check_group_choices(["-m", "experiment=table4/famo,table4/fairgrad"], CONFIG_DIR)
    with pytest.raises(ConfigError, match=r"'table4/famoo'. Did you mean 'table4/famo'"):
        check_group_choices(["experiment=table4/famoo"], CONFIG_DIR)


def test_the_card_default_keeps_its_task_encoder_and_one_temperature() -> None:
    spec = build_run_spec(composed("combiner=ntkmtl", "device=cpu"))
    assert spec.agent.arch == "task_encoder" and spec.agent.disentangled_alpha is False
    assert build_run_spec(composed("agent.arch=independent", "device=cpu")).agent \
        .disentangled_alpha is True


def test_readme_documents_every_row() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reproducing Table 4"):]
    for row in AUTHORS:
        assert f"table4/{row}" in section, row


def test_mhsac_has_the_parameter_counts_of_mtrls_multi_head_networks() -> None:
    """mtrl (Sodhani et al.), MT10 with should_use_multi_head_policy=True, counted by hand.

    Per network: trunk build_mlp(D, 400, 400, num_layers=3) = Linear(D,400), Linear(400,400)
    x 2, Linear(400,400) [then nn.ReLU()]; heads moe_layer.FeedForward(num_experts=10, 400,
    out, hidden 400, num_layers=2) = moe Linear(400,400) and moe Linear(400,out), each with
    weight [10, in, out] and bias [10, 1, out]. Actor out = 2|A| (mean, log-std); each of the
    critic's two QFunctions reads obs and action (D + |A|) and outputs 1.
    """
    from mtrl_ntk.agent.models import Actor, TwinCritic

    spec = build_run_spec(composed("experiment=table4/mhsac", "device=cpu"))
    obs_dim, action_dim, tasks, width = 39, 4, 10, 400  # Meta-World 3.x MT10: 39-d, 4 actions

    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + fan_out

    def trunk(fan_in: int) -> int:
        return linear(fan_in, width) + 3 * linear(width, width)

    def heads(fan_out: int) -> int:
        return tasks * (linear(width, width) + linear(width, fan_out))

    expected_actor = {"shared": trunk(obs_dim), "specific": heads(2 * action_dim)}
    expected_critic = {
        "shared": 2 * trunk(obs_dim + action_dim), "specific": 2 * heads(1),
    }
    assert expected_actor == {"shared": 497_200, "specific": 1_636_080}
    assert expected_critic == {"shared": 997_600, "specific": 3_216_020}

    agent = spec.agent
    settings = {"arch": agent.arch, "hidden_dim": agent.hidden_dim,
                "num_layers": agent.num_layers, "head_layers": agent.head_layers}
    actor = Actor(obs_dim, action_dim, tasks, **settings)
    critic = TwinCritic(obs_dim, action_dim, tasks, **settings)
    for network, expected in ((actor, expected_actor), (critic, expected_critic)):
        counts = {"shared": 0, "specific": 0}
        for name, param in network.named_parameters():
            counts["specific" if network.is_task_specific(name) else "shared"] += param.numel()
        assert counts == expected
