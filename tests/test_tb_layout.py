"""TensorBoard custom-scalars layout and task-affinity image, written and read back for real."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.nn.functional import cosine_similarity
from torch.utils.tensorboard import SummaryWriter

from mtrl_ntk.tb_layout import (
    affinity_figure,
    affinity_image,
    custom_scalar_layout,
    diverging_colors,
    labelled_frame,
)
from tests.combiners.samplers import sample_task_gradients

MT10 = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]
CELL = 16


def read_events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def chart_tags(layout: dict) -> dict[str, list[str]]:
    """'category/chart' -> its tag regexes."""
    return {
        f"{category}/{chart}": spec[1]
        for category, charts in layout.items()
        for chart, spec in charts.items()
    }


def charts_matching(layout: dict, tag: str) -> list[str]:
    """Charts that would show ``tag`` (TensorBoard searches each regex in the tag)."""
    return [
        name for name, regexes in chart_tags(layout).items()
        if any(re.search(regex, tag) for regex in regexes)
    ]


def test_layout_is_written_and_read_back_from_a_real_event_file(tmp_path: Path) -> None:
    layout = custom_scalar_layout(MT10)
    with SummaryWriter(tmp_path) as writer:
        writer.add_custom_scalars(layout)
    accumulator = read_events(tmp_path)
    (event,) = accumulator.Tensors("custom_scalars__config__")
    stored = layout_pb2.Layout()
    stored.ParseFromString(event.tensor_proto.string_val[0])
    read_back = {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in stored.category
    }
    assert read_back == {
        category: {chart: spec[1] for chart, spec in charts.items()}
        for category, charts in layout.items()
    }
    assert read_back["Success"]["eval success per task"] == ["^eval/success/.*"]
    assert set(read_back["Success by task (eval, train)"]) == set(MT10)


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("eval/success/pick-place-v3", {"Success/eval success per task",
                                        "Success by task (eval, train)/pick-place-v3"}),
        ("train/success/reach-v3", {"Success/train success per task",
                                    "Success by task (eval, train)/reach-v3"}),
        ("eval/success_mean", {"Success/mean success (eval, train)"}),
        ("combiner/critic/weight/door-open-v3", {"Combiner weights/critic weight per task"}),
        ("combiner/actor/weight/door-open-v3", {"Combiner weights/actor weight per task"}),
        ("combiner/critic/ntk_eigenvalue/push-v3", {"NTK eigenvalues/critic λ_i per task"}),
        ("combiner/actor/ntk_eigenvalue/push-v3", {"NTK eigenvalues/actor λ_i per task"}),
        ("loss/critic", {"Losses/critic loss"}),
        ("loss/actor/reach-v3", {"Losses/actor loss"}),
        ("loss/temperature", {"Losses/temperature loss"}),
        ("train/return/push-v3", {"Training/train return per task"}),
        ("temperature/push-v3", {"Training/temperature α"}),
        ("policy/entropy", {"Training/policy entropy"}),
        ("time/steps_per_second", {"Training/steps per second"}),
        ("time/eta_hours", {"Training/ETA (hours)"}),
    ],
)
def test_each_trainer_tag_lands_in_exactly_its_charts(tag: str, expected: set[str]) -> None:
    assert set(charts_matching(custom_scalar_layout(MT10), tag)) == expected


def test_per_task_chart_does_not_catch_a_task_whose_name_extends_another() -> None:
    layout = custom_scalar_layout(["reach-v3", "reach-wall-v3", "push-v3", "push-back-v3"])
    assert "Success by task (eval, train)/reach-v3" not in charts_matching(
        layout, "eval/success/reach-wall-v3")
    assert "Success by task (eval, train)/push-v3" not in charts_matching(
        layout, "eval/success/push-back-v3")


def cell_colors(image: torch.Tensor, tasks: int) -> torch.Tensor:
    """Colour at the centre of each task cell: [T, T, 3]."""
    centres = torch.arange(tasks) * CELL + CELL // 2
    return image[:, centres][:, :, centres].permute(1, 2, 0)


def test_affinity_cells_show_the_cosine_of_the_task_gradients() -> None:
    grads = sample_task_gradients(tasks=5, dim=40, seed=3)  # [T, d]
    grads[3] = -grads[1]  # a direct conflict
    image = affinity_image(grads @ grads.T, cell_pixels=CELL)
    assert image.shape == (3, 5 * CELL, 5 * CELL)
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    cosine = cosine_similarity(grads[:, None, :], grads[None, :, :], dim=-1)  # [T, T]
    expected = diverging_colors(cosine).float()
    assert torch.allclose(cell_colors(image, 5), expected, atol=1e-5)
    assert torch.equal(image, image.transpose(1, 2))  # symmetric, like G
    red, blue = diverging_colors(torch.tensor([1.0, -1.0]))
    assert torch.allclose(cell_colors(image, 5)[2, 2], red.float())  # diagonal: aligned with itself
    assert torch.allclose(cell_colors(image, 5)[1, 3], blue.float())  # g_3 = -g_1


def test_affinity_image_is_scale_invariant_and_zero_safe() -> None:
    grads = sample_task_gradients(tasks=4, dim=30, seed=0, norms=[1e-3, 1.0, 10.0, 1e3])
    gramian = grads.double() @ grads.double().T
    assert torch.allclose(affinity_image(gramian), affinity_image(gramian * 1e6), atol=1e-6)
    grads[2] = 0.0
    image = affinity_image(grads @ grads.T, cell_pixels=CELL)
    assert torch.isfinite(image).all()
    neutral = diverging_colors(torch.tensor(0.0)).float()
    colors = cell_colors(image, 4)
    assert torch.allclose(colors[2], neutral.expand(4, 3))
    assert torch.allclose(colors[:, 2], neutral.expand(4, 3))


def test_affinity_image_rejects_a_non_square_matrix() -> None:
    with pytest.raises(ValueError, match="square"):
        affinity_image(torch.ones(3, 4))


def test_affinity_image_is_logged_and_read_back_from_a_real_event_file(tmp_path: Path) -> None:
    grads = sample_task_gradients(tasks=10, dim=64, seed=1)
    image = affinity_image(grads @ grads.T, cell_pixels=CELL)
    with SummaryWriter(tmp_path) as writer:
        writer.add_image("combiner/critic/affinity", image, global_step=20_000)
    accumulator = read_events(tmp_path)
    (event,) = accumulator.Images("combiner/critic/affinity")
    assert event.step == 20_000
    assert (event.width, event.height) == (10 * CELL, 10 * CELL)
    decoded = matplotlib.image.imread(io.BytesIO(event.encoded_image_string), format="png")
    decoded = torch.from_numpy(decoded[..., :3].copy()).permute(2, 0, 1)  # [3, H, W]
    assert torch.allclose(decoded, image, atol=1.5 / 255)  # 8-bit PNG round trip


def test_labelled_affinity_image_names_every_task_and_keeps_the_cell_colours() -> None:
    grads = sample_task_gradients(tasks=10, dim=40, seed=5)  # [T, d]
    grads[4] = -grads[0]
    image = affinity_image(grads @ grads.T, MT10)
    frame, (top, bottom, left, right) = labelled_frame(tuple(MT10))
    assert image.shape == frame.shape and image.shape[1] > 10 * CELL and image.shape[2] > 10 * CELL
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    # Cell (i, j) sits at row i, column j of the box: its centre has the cosine's colour.
    cosine = cosine_similarity(grads[:, None, :], grads[None, :, :], dim=-1)  # [T, T]
    rows = top + ((torch.arange(10) + 0.5) * (bottom - top) / 10).long()
    columns = left + ((torch.arange(10) + 0.5) * (right - left) / 10).long()
    centres = image[:, rows][:, :, columns].permute(1, 2, 0)  # [T, T, 3]
    assert torch.allclose(centres, diverging_colors(cosine).float(), atol=1e-5)
    # Outside the box the drawn frame (names, colour bar) is untouched.
    assert torch.equal(image[:, :top], frame[:, :top])
    assert torch.equal(image[:, :, right + 1:], frame[:, :, right + 1:])
    figure, axes = affinity_figure(diverging_colors(cosine), MT10)
    assert [label.get_text() for label in axes.get_xticklabels()] == MT10
    assert [label.get_text() for label in axes.get_yticklabels()] == MT10
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("task j", "task i")
    assert "cosine similarity" in figure.axes[1].get_ylabel()  # the colour bar


def test_labelled_affinity_image_needs_one_name_per_task() -> None:
    with pytest.raises(ValueError, match="3 names for a Gramian of 4 tasks"):
        affinity_image(torch.eye(4), ["a", "b", "c"])
