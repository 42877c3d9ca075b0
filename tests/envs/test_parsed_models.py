"""Reusing parsed MuJoCo models while building envs changes nothing an env returns."""

from __future__ import annotations

import contextlib
import dataclasses

import mujoco
import numpy as np
import pytest

from mtrl_ntk.envs import PROTOCOLS, MultiTaskEnv, metaworld_env

HORIZON = 10
# A goal drawn at every reset (Meta-World writes each goal into its model, so envs sharing a
# model would drift apart); 3 goals, not mwplus's 50, whose drawing takes seconds per env.
GOALS_RESAMPLED = dataclasses.replace(PROTOCOLS["mwplus"], num_goals=3)


def make_env() -> MultiTaskEnv:
    return MultiTaskEnv(
        "mt10", GOALS_RESAMPLED, seed=4, vector_strategy="sync", max_episode_steps=HORIZON
    )


@pytest.mark.slow
def test_envs_built_from_reused_models_step_exactly_as_freshly_parsed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = vars(mujoco.MjModel)["from_xml_path"]
    with monkeypatch.context() as patch:
        patch.setattr(metaworld_env, "parsed_models_reused", contextlib.nullcontext)
        reference = make_env()
    first, second = make_env(), make_env()  # the second one copies every model from the cache
    assert vars(mujoco.MjModel)["from_xml_path"] is original  # the patch ends with the block
    envs = [reference, first, second]
    models = [[env.unwrapped.model for env in e._vector_env.envs] for e in envs]
    assert len({id(model) for per_env in models for model in per_env}) == 3 * 10
    rng = np.random.default_rng(0)
    try:
        observations = [env.reset() for env in envs]
        for obs in observations[1:]:
            np.testing.assert_array_equal(obs, observations[0])
        for _ in range(3 * HORIZON):  # three episodes, two goal changes
            actions = rng.uniform(-1, 1, (10, 4)).astype(np.float32)
            results = [env.step(actions) for env in envs]
            for result in results[1:]:
                for field, value in vars(result).items():
                    np.testing.assert_array_equal(value, getattr(results[0], field), err_msg=field)
        assert results[0].episode_end.all()
    finally:
        for env in envs:
            env.close()


def test_the_patch_ends_when_building_fails() -> None:
    original = vars(mujoco.MjModel)["from_xml_path"]
    with pytest.raises(ValueError, match="boom"), metaworld_env.parsed_models_reused():
        assert vars(mujoco.MjModel)["from_xml_path"] is not original
        raise ValueError("boom")
    assert vars(mujoco.MjModel)["from_xml_path"] is original
