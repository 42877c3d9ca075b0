"""The capture rules for NTKMTL(-SR), FAMO, MoCo, UW, DWA, RLW, GradDrop, SI and LS.

No host sync in ``combine``/``update_after_step``; a compiled update (one graph,
``fullgraph=True``) matches the eager one call after call, state included, with no
recompilation; the state lives in tensors updated in place that ``state_tensors()``
lists and ``load_state_dict`` copies into.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from mtrl_ntk.combiners import (
    GradientCombiner,
    Need,
    direction_from_output,
    make_combiner,
    stats_from_gradients,
)
from mtrl_ntk.combiners.ntkmtl import largest_eigenvalues
from mtrl_ntk.opcount import OpCounter

NUM_TASKS, DIM = 4, 40

# id -> (registered name, hyperparameters)
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "ntkmtl": ("ntkmtl", {}),
    "ntkmtl_n4": ("ntkmtl", {"num_minibatches": 4}),
    "ntkmtl_sr": ("ntkmtl_sr", {"num_minibatches": 4}),
    "famo": ("famo", {}),
    "moco": ("moco", {}),
    "uw": ("uw", {}),
    "dwa": ("dwa", {}),
    "rlw": ("rlw", {}),
    "graddrop": ("graddrop", {}),
    "si": ("si", {}),
    "ls": ("ls", {}),
}
RANDOM = {"rlw", "graddrop"}  # their state is a generator, not tensors


def build(spec: str, seed: int = 0) -> GradientCombiner:
    name, params = SPECS[spec]
    torch.manual_seed(seed)  # the random methods seed their generator from the global RNG
    return make_combiner(name, NUM_TASKS, **params)


def inputs(combiner: GradientCombiner, index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients [T, n, d] (float32, the parameters' dtype), losses and losses after the step."""
    generator = torch.Generator().manual_seed(100 + index)
    shape = (NUM_TASKS, combiner.num_minibatches, DIM)
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0])[:, None, None]
    grads = torch.randn(shape, generator=generator) * scales
    losses = 0.5 + torch.rand(NUM_TASKS, generator=generator, dtype=torch.float64)
    return grads, losses, losses * (0.7 + 0.2 * torch.rand(NUM_TASKS, generator=generator).double())


def update(combiner: GradientCombiner, grads: Tensor, losses: Tensor, losses_after: Tensor,
           random: Tensor | None) -> tuple[Tensor, Tensor]:
    """What the agent's compiled update does with a combiner: direction and weights."""
    stats = stats_from_gradients(grads, combiner.need, losses)
    stats.random = random
    output = combiner.combine(stats)
    if Need.LOSSES_AFTER_STEP in combiner.need:
        combiner.update_after_step(losses_after)
    return direction_from_output(output, stats.task_gradients), output.diagnostics["weights"]


def eager_step(combiner: GradientCombiner, index: int) -> tuple[Tensor, Tensor]:
    grads, losses, after = inputs(combiner, index)
    random = combiner.draw_random(DIM, grads.device)
    return update(combiner, grads, losses, after, random)


def assert_states_equal(got: Any, want: Any, rtol: float = 0.0) -> None:
    """Equal state dicts (tensors within ``rtol``, bit for bit by default)."""
    if isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            assert_states_equal(got[key], want[key], rtol)
    elif isinstance(want, Tensor):
        assert isinstance(got, Tensor) and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=0.0)
    else:
        assert got == want


# --- the sync-free largest eigenvalue ---------------------------------------------------------


def _blocks(kind: str, n: int, generator: torch.Generator) -> Tensor:
    batch = 20
    if kind == "random":
        rows = torch.randn(batch, n, 3 * n, generator=generator, dtype=torch.float64)
        return rows @ rows.transpose(1, 2)
    if kind == "rank1":
        column = torch.randn(batch, n, 1, generator=generator, dtype=torch.float64)
        return column @ column.transpose(1, 2)
    if kind == "zero":
        return torch.zeros(batch, n, n, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    values = torch.rand(batch, n, generator=generator, dtype=torch.float64)
    if kind == "repeated":  # the top eigenvalue twice (once for n = 1)
        values[:, -2:] = 1.5
    elif kind == "near_repeated":  # top gap 1e-9: the slowest case for repeated squaring
        values = values * 1e-3
        values[:, -2:] = torch.tensor([1 - 1e-9, 1.0], dtype=torch.float64)[-min(n, 2):]
    elif kind == "huge_ratio":  # eigenvalues from 1e-10 to 1e12
        values = torch.logspace(-10, 12, n, dtype=torch.float64).expand(batch, n)
    return basis @ torch.diag_embed(values) @ basis.transpose(1, 2)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    "kind", ["random", "rank1", "repeated", "near_repeated", "huge_ratio", "zero"]
)
def test_largest_eigenvalues_equal_eigvalsh_to_rounding(kind: str, n: int) -> None:
    blocks = _blocks(kind, n, torch.Generator().manual_seed(n))
    got = largest_eigenvalues(blocks)
    want = torch.linalg.eigvalsh(blocks)[:, -1].clamp_min(0.0)
    if kind == "zero":
        assert torch.equal(got, torch.zeros_like(got))
    else:
        torch.testing.assert_close(got, want, rtol=8 * n * 2.0**-52, atol=0.0)


def test_largest_eigenvalues_do_not_synchronise() -> None:
    blocks = _blocks("random", 4, torch.Generator().manual_seed(0))
    with OpCounter() as counter:
        largest_eigenvalues(blocks)
    assert counter.syncs == 0, counter.sync_names


# --- per combiner -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_combine_and_update_after_step_do_not_synchronise(spec: str) -> None:
    combiner = build(spec)
    for index in range(3):  # the first calls too (warm-up rules, first Adam step)
        grads, losses, after = inputs(combiner, index)
        random = combiner.draw_random(DIM, grads.device)
        with OpCounter() as counter:
            update(combiner, grads, losses, after, random)
        assert counter.syncs == 0, counter.sync_names


@pytest.mark.parametrize("spec", SPECS)
def test_compiled_update_matches_eager_without_recompiling(spec: str) -> None:
    torch._dynamo.reset()
    eager, compiled = build(spec), build(spec)

    def step(grads: Tensor, losses: Tensor, losses_after: Tensor, random: Tensor | None):
        return update(compiled, grads, losses, losses_after, random)

    compiled_step = torch.compile(step, fullgraph=True, backend="eager")
    for index in range(4):
        grads, losses, after = inputs(compiled, index)
        random = compiled.draw_random(DIM, grads.device)
        if index == 0:
            got = compiled_step(grads, losses, after, random)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled_step(grads, losses, after, random)
        want = eager_step(eager, index)
        # Dynamo may fold Python-float constants in another order: equal to rounding.
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
        assert_states_equal(compiled.state_dict(), eager.state_dict(), rtol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_state_tensors_are_updated_in_place_and_restore_the_state(spec: str) -> None:
    combiner = build(spec).to("cpu")
    eager_step(combiner, 0)  # everything allocated (MoCo's y at the latest here)
    tensors = combiner.state_tensors()
    if spec in RANDOM or spec in ("ntkmtl", "ntkmtl_n4", "ntkmtl_sr", "si", "ls"):
        assert tensors == []
        return
    assert tensors
    pointers = [tensor.data_ptr() for tensor in tensors]
    snapshot = [tensor.clone() for tensor in tensors]
    saved = combiner.state_dict()
    for index in range(1, 3):
        eager_step(combiner, index)
    after = combiner.state_tensors()
    assert [tensor.data_ptr() for tensor in after] == pointers  # never rebound
    assert not all(torch.equal(a, b) for a, b in zip(after, snapshot, strict=True))
    for tensor, value in zip(after, snapshot, strict=True):
        tensor.copy_(value)  # what the agent's guard does (with torch.where)
    assert_states_equal(combiner.state_dict(), saved)


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip_copies_into_the_existing_tensors(spec: str) -> None:
    original = build(spec, seed=1)
    for index in range(3):
        eager_step(original, index)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build(spec, seed=2)
    eager_step(restored, 0)
    pointers = [tensor.data_ptr() for tensor in restored.state_tensors()]
    restored.load_state_dict(torch.load(buffer))
    assert [tensor.data_ptr() for tensor in restored.state_tensors()] == pointers
    assert_states_equal(restored.state_dict(), original.state_dict())
    for index in range(3, 5):
        got, want = eager_step(restored, index), eager_step(original, index)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("spec", ["rlw", "graddrop"])
def test_draw_random_gives_the_numbers_combine_would_draw(spec: str) -> None:
    drawn, drawing = build(spec), build(spec)
    for index in range(3):
        grads, losses, after = inputs(drawn, index)
        random = drawn.draw_random(DIM, grads.device)
        assert random is not None and random.device == grads.device
        got = update(drawn, grads, losses, after, random)
        want = update(drawing, grads, losses, after, None)  # combine draws itself
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_states_equal(drawn.state_dict(), drawing.state_dict())


def test_adam_step_counts_load_from_python_ints() -> None:
    """Checkpoints written before the step count became a tensor still load."""
    for name in ("famo", "uw"):
        combiner = make_combiner(name, NUM_TASKS)
        state = {**combiner.state_dict(), "adam_steps": 7}
        combiner.load_state_dict(state)
        assert combiner.state_dict()["adam_steps"].item() == 7.0


def test_dwa_warm_up_is_a_select_on_the_count() -> None:
    dwa = make_combiner("dwa", 2)
    weights = []
    for losses in ([1.0, 2.0], [0.5, 1.5], [1.0, 1.0]):
        stats = stats_from_gradients(torch.eye(2).double(), dwa.need, torch.tensor(losses).double())
        weights.append(dwa.combine(stats).weights)
    assert torch.equal(weights[0], torch.ones(2).double())
    assert torch.equal(weights[1], torch.ones(2).double())
    e0, e1 = math.exp(0.25), math.exp(0.375)
    torch.testing.assert_close(weights[2], torch.tensor([2 * e0, 2 * e1]).double() / (e0 + e1))
    assert int(dwa.history_count) == 2
