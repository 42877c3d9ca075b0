"""The combiner registry: names, and errors that name what is wrong and what is allowed."""

from __future__ import annotations

import re
from typing import Any

import pytest

from mtrl_ntk.combiners import available_combiners, combiner_params, make_combiner

EXPECTED_COMBINERS = sorted([
    "ls", "ntkmtl", "ntkmtl_sr", "pcgrad", "cagrad", "nashmtl", "fairgrad", "aligned_mtl",
    "mgda", "imtlg", "famo", "moco", "uw", "dwa", "rlw", "graddrop", "si",
])


def test_available_combiners_lists_exactly_the_designed_methods() -> None:
    assert available_combiners() == EXPECTED_COMBINERS


def test_unknown_name_lists_valid_names_and_the_closest_match() -> None:
    with pytest.raises(ValueError) as error:
        make_combiner("ntkmlt", num_tasks=3)
    message = str(error.value)
    assert "Did you mean 'ntkmtl'" in message
    for name in available_combiners():
        assert name in message


def test_unknown_parameter_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'temprature'") as error:
        make_combiner("dwa", num_tasks=3, temprature=2.0)
    assert "temperature" in str(error.value).split("parameters are:")[1]


@pytest.mark.parametrize("name", ["ls", "rlw", "uw", "si", "graddrop"])
def test_methods_without_hyperparameters_reject_any(name: str) -> None:
    assert combiner_params(name) == {}
    with pytest.raises(ValueError, match="'lr'"):
        make_combiner(name, num_tasks=3, lr=0.1)


INVALID_VALUES: list[tuple[str, str, Any]] = [
    ("cagrad", "c", -0.5),
    ("fairgrad", "alpha", 0.0),
    ("fairgrad", "alpha", -1.0),
    ("aligned_mtl", "scale_mode", "mean"),
    ("ntkmtl", "exponent", -0.5),
    ("ntkmtl", "num_minibatches", 0),
    ("ntkmtl_sr", "num_minibatches", 0),
    ("ntkmtl", "num_minibatches", 2.5),
    ("dwa", "temperature", 0.0),
    ("dwa", "temperature", -2.0),
    ("famo", "gamma", -0.001),
    ("famo", "w_lr", 0.0),
    ("moco", "beta", 0.0),
    ("moco", "beta", 1.5),
    ("moco", "gamma", 0.0),
    ("moco", "rho", -1.0),
    ("moco", "beta", float("nan")),
    ("famo", "w_lr", True),
]


@pytest.mark.parametrize(("name", "param", "value"), INVALID_VALUES)
def test_invalid_value_raises_naming_the_parameter(name: str, param: str, value: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"'{param}'")):
        make_combiner(name, num_tasks=3, **{param: value})


@pytest.mark.parametrize("num_tasks", [0, -1, 2.0])
def test_invalid_number_of_tasks_raises(num_tasks: Any) -> None:
    with pytest.raises(ValueError, match="num_tasks"):
        make_combiner("famo", num_tasks=num_tasks)


@pytest.mark.parametrize("name", available_combiners())
def test_every_combiner_builds_with_its_defaults(name: str) -> None:
    combiner = make_combiner(name, num_tasks=3, **combiner_params(name))
    assert combiner.name == name
    assert combiner.num_tasks == 3
