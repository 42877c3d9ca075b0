"""The run's seed is split into independent streams (policy noise, replay sampler, warm-up)."""

from __future__ import annotations

import inspect

from mtrl_ntk.rng import derive_seeds
from mtrl_ntk.trainer import SeedRun


def test_derived_seeds_are_distinct_deterministic_and_fit_a_torch_generator() -> None:
    seeds = derive_seeds(0, 3)
    assert len(set(seeds)) == 3 and seeds == derive_seeds(0, 3)
    assert set(seeds).isdisjoint(derive_seeds(1, 3))
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_the_trainer_seeds_each_generator_with_its_own_stream() -> None:
    source = inspect.getsource(SeedRun._build)
    assert "noise_seed, sample_seed, warmup_seed = derive_seeds(spec.seed, 3)" in source
    assert "seed=noise_seed" in source
    assert "manual_seed(sample_seed)" in source and "default_rng(warmup_seed)" in source
