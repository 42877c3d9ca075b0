"""``MaybeCompiled``: compiled when it can be, eager (with one warning) when compiling fails."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mtrl_ntk.compilation import MaybeCompiled


def scaled_softplus(x: Tensor, scale: float) -> Tensor:
    if x.dim() != 1:
        raise ValueError("x must be a vector")
    return scale * torch.nn.functional.softplus(x)


def failing_backend(graph_module: torch.fx.GraphModule, example_inputs: list[Tensor]):
    raise RuntimeError("this backend cannot compile anything")


def test_a_working_backend_keeps_the_compiled_function_and_its_result() -> None:
    function = MaybeCompiled(scaled_softplus, "softplus", enabled=True, backend="eager")
    x = torch.linspace(-3.0, 3.0, 7)
    torch.testing.assert_close(function(x, 2.0), scaled_softplus(x, 2.0))
    assert function.compiled and function.failure is None


def test_a_compiler_failure_warns_once_and_falls_back_to_the_eager_result() -> None:
    function = MaybeCompiled(scaled_softplus, "softplus", enabled=True, backend=failing_backend)
    x = torch.linspace(-3.0, 3.0, 7)
    with pytest.warns(RuntimeWarning, match="torch.compile of softplus failed"):
        result = function(x, 2.0)
    torch.testing.assert_close(result, scaled_softplus(x, 2.0))
    assert not function.compiled
    assert "this backend cannot compile anything" in function.failure
    torch.testing.assert_close(function(x, 3.0), scaled_softplus(x, 3.0))  # eager, no warning


def test_an_error_of_the_inputs_is_raised_and_compilation_stays_on() -> None:
    function = MaybeCompiled(scaled_softplus, "softplus", enabled=True, backend="eager")
    with pytest.raises(ValueError, match="must be a vector"):
        function(torch.zeros(2, 2), 1.0)
    assert function.compiled


def test_disabled_is_the_plain_function() -> None:
    function = MaybeCompiled(scaled_softplus, "softplus", enabled=False)
    x = torch.randn(5)
    assert not function.compiled
    torch.testing.assert_close(function(x, 1.5), scaled_softplus(x, 1.5))
