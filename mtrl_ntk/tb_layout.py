"""TensorBoard dashboards: a custom-scalars layout and the task-affinity image.

The trainer calls, once per run and once per evaluation::

    writer.add_custom_scalars(custom_scalar_layout(env.task_names))
    writer.add_image("combiner/critic/affinity", affinity_image(gramian, env.task_names), step)

The layout's regexes match the tags the trainer writes, which are the keys of
``metrics.jsonl`` (``eval/success/<task>``, ``combiner/critic/weight/<task>``,
``combiner/critic/ntk_eigenvalue/<task>``, ...), losses under ``loss/``
(``loss/critic``, ``loss/actor``, ``loss/temperature``, optionally followed by
``/<task>``), ``train/return/<task>``, ``temperature``, ``policy/entropy`` and
``time/steps_per_second``, ``time/eta_hours``. TensorBoard matches a multiline
chart's tags with a regex search.

The layout and the bare affinity cells need only torch. With task names, the
affinity image is drawn by matplotlib (imported on first use, Agg backend): task
names on both axes and a labelled colour bar. matplotlib is therefore part of
the ``rl`` extra, which the trainer installs.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import torch
from torch import Tensor

# ColorBrewer RdBu (reversed), sampled at cosine -1, -0.5, 0, 0.5, 1: blue for
# conflicting tasks, near-white for orthogonal ones, red for aligned ones.
_DIVERGING_ANCHORS = torch.tensor(
    [
        [0x05, 0x30, 0x61],
        [0x43, 0x93, 0xC3],
        [0xF7, 0xF7, 0xF7],
        [0xD6, 0x60, 0x4D],
        [0x67, 0x00, 0x1F],
    ],
    dtype=torch.float64,
) / 255.0  # [5, 3], RGB in [0, 1]

LOSS_PREFIX = "loss/"


def custom_scalar_layout(task_names: list[str]) -> dict[str, dict[str, list]]:
    """Layout for ``SummaryWriter.add_custom_scalars``: ``{category: {chart: [kind, tags]}}``.

    Categories: success (eval and train, all tasks in one multiline chart each,
    plus the means), one chart per task with its eval and train success,
    combiner weights per task (critic, actor), NTK eigenvalues λ_i per task
    (critic, actor), losses, and training health (returns, temperature,
    entropy, steps per second, ETA). ``task_names`` are escaped, so names such as
    ``pick-place-v3`` match literally.
    """
    per_task = {
        task: ["Multiline", [f"^(eval|train)/success/{re.escape(task)}$"]] for task in task_names
    }
    per_network = {
        kind: {
            f"{network} {label}": ["Multiline", [f"^combiner/{network}/{kind}/.*"]]
            for network in ("critic", "actor")
        }
        for kind, label in (("weight", "weight per task"), ("ntk_eigenvalue", "λ_i per task"))
    }
    return {
        "Success": {
            "eval success per task": ["Multiline", ["^eval/success/.*"]],
            "train success per task": ["Multiline", ["^train/success/.*"]],
            "mean success (eval, train)": [
                "Multiline", ["^eval/success_mean$", "^train/success_mean$"],
            ],
        },
        "Success by task (eval, train)": per_task,
        "Combiner weights": per_network["weight"],
        "NTK eigenvalues": per_network["ntk_eigenvalue"],
        "Losses": {
            f"{name} loss": ["Multiline", [f"^{LOSS_PREFIX}{name}(/.*)?$"]]
            for name in ("critic", "actor", "temperature")
        },
        "Training": {
            "train return per task": ["Multiline", ["^train/return/.*"]],
            "mean train return": ["Multiline", ["^train/return_mean$"]],
            "temperature α": ["Multiline", ["^temperature(/.*)?$"]],
            "policy entropy": ["Multiline", ["^policy/entropy(/.*)?$"]],
            "steps per second": ["Multiline", ["^time/steps_per_second$"]],
            "ETA (hours)": ["Multiline", ["^time/eta_hours$"]],
        },
    }


def cosine_similarity_matrix(gramian: Tensor) -> Tensor:
    """C_ij = G_ij / sqrt(G_ii G_jj) for a Gramian G = J Jᵀ [T, T], in float64.

    Zero-safe: a task with a zero gradient (G_ii = 0) has no direction, so its
    whole row and column, diagonal included, are 0 (neutral), never NaN.
    Non-finite entries also become 0; rounding is clipped to [-1, 1].
    """
    gramian = gramian.detach().double().cpu()
    gramian = torch.nan_to_num(gramian, nan=0.0, posinf=0.0, neginf=0.0)
    norms = gramian.diagonal().clamp_min(0.0).sqrt()  # [T], ‖g_i‖
    denominator = norms[:, None] * norms[None, :]  # [T, T]
    safe = denominator > 0
    cosine = torch.where(safe, gramian / torch.where(safe, denominator, 1.0), 0.0)
    return cosine.clamp(-1.0, 1.0)


def diverging_colors(values: Tensor) -> Tensor:
    """Map values in [-1, 1] to RGB [..., 3] in [0, 1] (RdBu reversed; 0 is near-white)."""
    position = (values.double().clamp(-1.0, 1.0) + 1.0) / 2.0 * (len(_DIVERGING_ANCHORS) - 1)
    lower = position.floor().long().clamp(max=len(_DIVERGING_ANCHORS) - 2)
    fraction = (position - lower).unsqueeze(-1)
    return (1 - fraction) * _DIVERGING_ANCHORS[lower] + fraction * _DIVERGING_ANCHORS[lower + 1]


def affinity_image(
    gramian: Tensor, task_names: list[str] | None = None, cell_pixels: int = 16
) -> Tensor:
    """Task-affinity image [3, H, W], float32 in [0, 1].

    Cell (i, j) shows the cosine between task gradients i and j (the normalised
    Gramian, see ``cosine_similarity_matrix``): red aligned (+1), white
    orthogonal (0), blue conflicting (-1). Row i from the top and column i from
    the left are task i, as in the Gramian.

    Without ``task_names``: the bare cells, each task a square of ``cell_pixels``
    (H = W = T * cell_pixels; T = 10 gives 160x160). With ``task_names`` (one per
    row of the Gramian): those same cells drawn by matplotlib with the task names
    on both axes, a title and a colour bar labelled "cosine similarity" (the
    trainer's images in TensorBoard).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        shape = tuple(gramian.shape)
        raise ValueError(f"gramian must be a square matrix [T, T], got shape {shape}")
    if cell_pixels < 1:
        raise ValueError(f"cell_pixels must be >= 1, got {cell_pixels}")
    if task_names is not None and len(task_names) != gramian.shape[0]:
        raise ValueError(
            f"task_names has {len(task_names)} names for a Gramian of {gramian.shape[0]} tasks"
        )
    colors = diverging_colors(cosine_similarity_matrix(gramian))  # [T, T, 3]
    if task_names is not None:
        return _labelled_image(colors, task_names)
    image = colors.permute(2, 0, 1)  # [3, T, T]
    image = image.repeat_interleave(cell_pixels, dim=1).repeat_interleave(cell_pixels, dim=2)
    return image.float()


def affinity_figure(colors: Tensor, task_names: list[str]):
    """The labelled affinity figure: cells [T, T, 3] RGB, task names on both axes, colour bar.

    Returns ``(figure, axes)``, the axes holding the cells (matplotlib, Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    tasks = len(task_names)
    side = 2.6 + 0.42 * tasks  # inches: room for the cells and the rotated names
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(colors.numpy(), interpolation="nearest")
    axes.set_xticks(range(tasks), task_names, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(tasks), task_names, fontsize=8)
    axes.set_xlabel("task j")
    axes.set_ylabel("task i")
    axes.set_title("cosine between task gradients", fontsize=10)
    scale = ListedColormap(diverging_colors(torch.linspace(-1.0, 1.0, 256)).numpy())
    figure.colorbar(ScalarMappable(Normalize(-1.0, 1.0), scale), ax=axes, fraction=0.046,
                    pad=0.04, label="cosine similarity (1 aligned, -1 conflicting)")
    figure.tight_layout()
    return figure, axes


@functools.lru_cache(maxsize=8)
def labelled_frame(task_names: tuple[str, ...]) -> tuple[Tensor, tuple[int, int, int, int]]:
    """The labelled figure drawn once per task list: pixels [3, H, W] and the cells' pixel box.

    Drawing text is what costs (~0.3 s a figure); each evaluation only paints its
    cells into a copy of these pixels. The box is (top, bottom, left, right) in
    pixel rows/columns, inside the axes' frame.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    blank = torch.ones(len(task_names), len(task_names), 3, dtype=torch.float64)  # [T, T, 3]
    figure, axes = affinity_figure(blank, list(task_names))
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = torch.from_numpy(np.asarray(canvas.buffer_rgba()).copy())  # [H, W, 4] uint8
    height = rgba.shape[0]
    box = axes.get_window_extent()  # display pixels, origin at the bottom left
    cells = (
        math.ceil(height - box.y1), math.floor(height - box.y0),
        math.ceil(box.x0), math.floor(box.x1),
    )
    return rgba[:, :, :3].permute(2, 0, 1).float() / 255.0, cells


def _labelled_image(colors: Tensor, task_names: list[str]) -> Tensor:
    frame, (top, bottom, left, right) = labelled_frame(tuple(task_names))
    tasks = len(task_names)
    rows = torch.arange(bottom - top) * tasks // (bottom - top)  # pixel row -> task i
    columns = torch.arange(right - left) * tasks // (right - left)  # pixel column -> task j
    image = frame.clone()
    image[:, top:bottom, left:right] = colors[rows][:, columns].permute(2, 0, 1).float()
    return image
