"""TensorBoard dashboards: a custom-scalars layout and the task-affinity image.

The trainer calls, once per run and once per evaluation::

    writer.add_custom_scalars(custom_scalar_layout(env.task_names))
    writer.add_image("combiner/critic/affinity", affinity_image(result.gramian), step)

The layout's regexes match the tags the trainer writes, which are the keys of
``metrics.jsonl`` (``eval/success/<task>``, ``combiner/critic/weight/<task>``,
``combiner/critic/ntk_eigenvalue/<task>``, ...), losses under ``loss/``
(``loss/critic``, ``loss/actor``, ``loss/temperature``, optionally followed by
``/<task>``), ``train/return/<task>``, ``temperature``, ``policy/entropy`` and
``time/steps_per_second``, ``time/eta_hours``. TensorBoard matches a multiline
chart's tags with a regex search.

Only torch is needed here (no matplotlib): the trainer must not depend on the
``report`` extra.
"""

from __future__ import annotations

import re

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


def affinity_image(gramian: Tensor, cell_pixels: int = 16) -> Tensor:
    """Task-affinity image [3, T*cell_pixels, T*cell_pixels], float32 in [0, 1].

    Pixel block (i, j) shows the cosine between task gradients i and j (the
    normalised Gramian, see ``cosine_similarity_matrix``): red aligned (+1),
    white orthogonal (0), blue conflicting (-1). Each task is a square of
    ``cell_pixels`` so the image is legible in TensorBoard (T = 10 gives 160x160).
    Row i from the top is task i, as in the Gramian.
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        shape = tuple(gramian.shape)
        raise ValueError(f"gramian must be a square matrix [T, T], got shape {shape}")
    if cell_pixels < 1:
        raise ValueError(f"cell_pixels must be >= 1, got {cell_pixels}")
    colors = diverging_colors(cosine_similarity_matrix(gramian))  # [T, T, 3]
    image = colors.permute(2, 0, 1)  # [3, T, T]
    image = image.repeat_interleave(cell_pixels, dim=1).repeat_interleave(cell_pixels, dim=2)
    return image.float()
