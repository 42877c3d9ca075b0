"""Actor and twin critic of multi-task SAC, in four task-conditioning architectures.

Every network maps ``(obs [B, D], task_ids long [B])`` (plus the action for the
critic) to its outputs and to its shared representation ``z``, the output of the
last hidden layer (the trunk output before the output layer or the task heads),
which NTKMTL-SR differentiates against (Qin et al., NeurIPS 2025, Eq. 17).

Architectures (``arch``; the rows of the paper's Table 4):

- ``mtsac``: the task one-hot concatenated to the observation; all parameters shared.
- ``obs_only``: all parameters shared and no task input at all: the networks read
  the observation only. This is what mtrl builds when ``should_use_task_encoder``
  is False (``mtrl/agent/components/actor.py``: the task information is then not
  concatenated), i.e. the network of mtrl's MT-SAC, PCGrad, FAMO and FairGrad MT10
  commands; only a per-task temperature (``disentangled_alpha``) and the
  observation itself tell the tasks apart.
- ``task_encoder``: a learned task encoding concatenated to the observation
  ("MTL SAC + TE"), with mtrl's semantics: ONE task encoder, owned by the critic
  and trained by the critic loss only (mtrl's ``losses_to_train``); the actor
  receives the encoding detached (``TwinCritic.encode(...).detach()``, passed as
  ``task_encoding``), so the actor loss never reaches the encoder. The embedding
  rows are task-specific parameters (row i is only touched by task i), the
  encoder's MLP is shared.
- ``multihead``: a shared trunk on the observation, one output head per task
  ("MH SAC"); the heads are task-specific parameters. ``head_layers`` sets each
  head's depth: 1 (a linear layer, the default) or mtrl's 2 (``_make_head(...,
  num_layers=2)``: a ReLU layer of ``hidden_dim`` and the output layer).
- ``independent``: one network per task ("STL"); every parameter is task-specific.

All forward passes are written with functional ops only (no in-place updates, no
data-dependent Python branching, no RNG: the actor's Gaussian noise is passed in)
so that ``torch.func.vmap`` of ``torch.func.functional_call`` works on them, as
the engine (``mtrl_ntk.engine``) needs for its per-task Jacobian.

Task-specific layers (``StackedLinear``) hold one weight per task, stacked
[T, in, out], and apply them with one batched matmul over *task blocks*: the B
samples of a call must come as ``G = gcd(B, T)`` contiguous equal-size blocks,
each from a single task. Every batch this package forms satisfies that: a batch
grouped [T, B_t] and flattened (G = T), one task's slice or mini-batch under the
engine's vmap (any G), and the acting batch ``task_ids = arange(T)`` (G = T).
A batch that interleaves tasks inside a block is not supported.

Initialisation follows mtrl (Sodhani et al., 2021): Xavier-uniform weights and
zero biases for every linear layer, N(0, 1) for the task embedding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHITECTURES = ("mtsac", "obs_only", "task_encoder", "multihead", "independent")


def check_architecture(arch: str) -> None:
    """Raise a ValueError naming the valid architectures unless ``arch`` is one."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"invalid value {arch!r} for 'arch': expected one of {', '.join(ARCHITECTURES)}"
        )


class SharedLinear(nn.Linear):
    """A linear layer shared by all tasks; takes (and ignores) ``task_ids`` like StackedLinear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, inputs: Tensor, task_ids: Tensor) -> Tensor:
        return F.linear(inputs, self.weight, self.bias)


class StackedLinear(nn.Module):
    """One linear layer per task: weight [T, in, out], bias [T, out], one batched matmul.

    The B samples are split into ``G = gcd(B, T)`` contiguous blocks; block g uses
    the weights of the task of its first sample (see the module docstring for why
    every batch of this package is made of single-task blocks). This costs the
    FLOPs of one shared layer, unlike computing all T outputs per sample, and it
    needs no per-sample copy of the weights.
    """

    def __init__(self, num_tasks: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.weight = nn.Parameter(torch.empty(num_tasks, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_tasks, out_features))
        with torch.no_grad():
            for task_weight in self.weight:  # each task's layer initialised like nn.Linear's
                nn.init.xavier_uniform_(task_weight)

    def forward(self, inputs: Tensor, task_ids: Tensor) -> Tensor:
        num_samples = inputs.shape[0]
        blocks = math.gcd(num_samples, self.num_tasks)
        block_inputs = inputs.reshape(blocks, num_samples // blocks, inputs.shape[-1])
        block_tasks = task_ids.reshape(blocks, -1)[:, 0]  # [G]
        weight = self.weight.index_select(0, block_tasks)  # [G, in, out]
        bias = self.bias.index_select(0, block_tasks).unsqueeze(1)  # [G, 1, out]
        outputs = torch.baddbmm(bias, block_inputs, weight)  # [G, B/G, out]
        return outputs.reshape(num_samples, -1)

    def extra_repr(self) -> str:
        tasks, in_features, out_features = self.weight.shape
        return f"num_tasks={tasks}, in_features={in_features}, out_features={out_features}"


def make_linear(
    task_specific: bool, num_tasks: int, in_features: int, out_features: int
) -> nn.Module:
    """A StackedLinear (one layer per task) or a SharedLinear."""
    if task_specific:
        return StackedLinear(num_tasks, in_features, out_features)
    return SharedLinear(in_features, out_features)


class TaskEncoder(nn.Module):
    """mtrl's TaskEncoder: embedding -> ReLU -> MLP (``num_layers`` ReLU hidden layers) -> output.

    With the defaults (embedding 50, two hidden layers of 50, output 50) this is
    mtrl's ``task_encoder_cfg`` for MT10 without pretrained (RoBERTa) embeddings.
    """

    def __init__(
        self,
        num_tasks: int,
        embedding_dim: int = 50,
        hidden_dim: int = 50,
        num_layers: int = 2,
        output_dim: int = 50,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tasks, embedding_dim)
        widths = [embedding_dim] + [hidden_dim] * num_layers
        self.hidden = nn.ModuleList(
            SharedLinear(fan_in, fan_out) for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )
        self.output = SharedLinear(widths[-1], output_dim)

    def forward(self, task_ids: Tensor) -> Tensor:
        features = F.relu(F.embedding(task_ids, self.embedding.weight))
        for layer in self.hidden:
            features = F.relu(layer(features, task_ids))
        return self.output(features, task_ids)


class TaskConditioning(nn.Module):
    """What is concatenated to the network input: the one-hot, a task encoding, or nothing.

    Parameter-free: the task encoding of ``task_encoder`` comes from the critic's
    ``TaskEncoder`` (see the module docstring) and is passed in.
    """

    def __init__(self, arch: str, num_tasks: int, task_embedding_dim: int) -> None:
        super().__init__()
        check_architecture(arch)
        self.arch = arch
        self.num_tasks = num_tasks
        self.needs_encoding = arch == "task_encoder"
        self.dim = {"mtsac": num_tasks, "task_encoder": task_embedding_dim}.get(arch, 0)

    def forward(self, inputs: Tensor, task_ids: Tensor, task_encoding: Tensor | None) -> Tensor:
        if self.arch == "mtsac":
            # F.one_hot checks its input's range (a host sync) and fails under vmap.
            tasks = torch.arange(self.num_tasks, device=task_ids.device)
            one_hot = (task_ids.unsqueeze(-1) == tasks).to(inputs.dtype)  # [B, T]
            return torch.cat([inputs, one_hot], dim=-1)
        if self.needs_encoding:
            if task_encoding is None:
                raise ValueError("the task_encoder architecture needs the task encoding [B, E]")
            return torch.cat([inputs, task_encoding], dim=-1)
        return inputs


class TaskMLP(nn.Module):
    """``num_layers`` ReLU hidden layers (the trunk, whose output is z) and a head of
    ``head_layers`` layers: ``head_layers - 1`` ReLU layers of ``hidden_dim`` and the
    linear output layer.

    The trunk is task-specific for ``independent``; the head is task-specific for
    ``multihead`` and ``independent``.
    """

    def __init__(
        self,
        arch: str,
        num_tasks: int,
        input_dim: int,
        output_dim: int,
        hidden_dim: int,
        num_layers: int,
        head_layers: int = 1,
    ) -> None:
        super().__init__()
        check_architecture(arch)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (z is a hidden layer), got {num_layers}")
        if head_layers < 1:
            raise ValueError(f"head_layers must be >= 1 (the output layer), got {head_layers}")
        specific_trunk = arch == "independent"
        specific_head = arch in ("multihead", "independent")
        self.hidden_dim = hidden_dim
        widths = [input_dim] + [hidden_dim] * num_layers
        self.hidden = nn.ModuleList(
            make_linear(specific_trunk, num_tasks, fan_in, fan_out)
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )
        self.head_hidden = nn.ModuleList(
            make_linear(specific_head, num_tasks, hidden_dim, hidden_dim)
            for _ in range(head_layers - 1)
        )
        self.output = make_linear(specific_head, num_tasks, hidden_dim, output_dim)

    def trunk(self, inputs: Tensor, task_ids: Tensor) -> Tensor:
        """The representation z [B, hidden_dim]: the last hidden layer's output."""
        features = inputs
        for layer in self.hidden:
            features = F.relu(layer(features, task_ids))
        return features

    def head(self, representation: Tensor, task_ids: Tensor) -> Tensor:
        features = representation
        for layer in self.head_hidden:
            features = F.relu(layer(features, task_ids))
        return self.output(features, task_ids)


class _TaskSpecificNames(nn.Module):
    """``is_task_specific(name)``: whether a parameter is stacked [T, ...], row i task i's.

    Those of a StackedLinear and the embedding table of a TaskEncoder (row i is
    task i's embedding and only task i's loss reaches it). The engine keeps them
    out of the shared Jacobian, hence out of the Gramian and the NTK blocks.
    """

    def _collect_task_specific(self) -> None:
        self._task_specific_names = frozenset(
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in self.named_modules()
            if isinstance(module, (StackedLinear, nn.Embedding))
            for param_name, _ in module.named_parameters(recurse=False)
        )

    def is_task_specific(self, name: str) -> bool:
        """True for parameters that belong to one task (a row of a stacked [T, ...] tensor)."""
        return name in self._task_specific_names


class ActorOutput(NamedTuple):
    mean: Tensor  # [B, A], of the Gaussian before the tanh
    log_std: Tensor  # [B, A], in [log_std_min, log_std_max]
    representation: Tensor  # [B, hidden_dim], z


class Actor(_TaskSpecificNames):
    """Tanh-Gaussian policy (Haarnoja et al., 2018, Appendix C), as mtrl's Actor.

    The MLP outputs the mean and a raw log-std; the log-std is squashed into
    [log_std_min, log_std_max] by ``tanh`` and an affine map (mtrl, pytorch_sac).
    Actions are ``tanh(mean + std * noise)`` in [-1, 1] (Meta-World's action box);
    see ``tanh_gaussian_sample``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_tasks: int,
        arch: str = "task_encoder",
        hidden_dim: int = 400,
        num_layers: int = 3,
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
        task_embedding_dim: int = 50,
        head_layers: int = 1,
    ) -> None:
        super().__init__()
        if not log_std_min < log_std_max:
            raise ValueError(f"need log_std_min < log_std_max, got {log_std_min}, {log_std_max}")
        self.log_std_min = float(log_std_min)
        self.log_std_max = float(log_std_max)
        self.conditioning = TaskConditioning(arch, num_tasks, task_embedding_dim)
        self.mlp = TaskMLP(
            arch, num_tasks, obs_dim + self.conditioning.dim, 2 * action_dim, hidden_dim,
            num_layers, head_layers,
        )
        self._collect_task_specific()

    @property
    def representation_dim(self) -> int:
        """The width of z."""
        return self.mlp.hidden_dim

    def forward(
        self, obs: Tensor, task_ids: Tensor, task_encoding: Tensor | None = None,
        representation_offset: Tensor | None = None,
    ) -> ActorOutput:
        """``task_encoding`` [B, E]: the critic's task encoding, detached (task_encoder only).
        ``representation_offset`` [B, h] (zeros) is added to z: differentiating with respect
        to it gives ∂ℓ/∂z under ``torch.func`` (NTKMTL-SR in a seed group)."""
        inputs = self.conditioning(obs, task_ids, task_encoding)
        representation = self.mlp.trunk(inputs, task_ids)  # [B, h]
        if representation_offset is not None:
            representation = representation + representation_offset
        mean, raw_log_std = self.mlp.head(representation, task_ids).chunk(2, dim=-1)
        log_std = squash_log_std(raw_log_std, self.log_std_min, self.log_std_max)
        return ActorOutput(mean, log_std, representation)


def squash_log_std(raw_log_std: Tensor, log_std_min: float, log_std_max: float) -> Tensor:
    """mtrl's bound: log_std_min + (log_std_max - log_std_min) * (tanh(raw) + 1) / 2."""
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (torch.tanh(raw_log_std) + 1.0)


_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def tanh_gaussian_sample(mean: Tensor, log_std: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Reparameterised sample a = tanh(u), u = mean + std * noise, and log π(a) [B].

    log π(a) = Σ_k [log N(u_k; mean_k, std_k) - log(1 - tanh(u_k)²)] (SAC, Eq. 21),
    with the stable form log(1 - tanh(u)²) = 2 (log 2 - u - softplus(-2u)) (as in
    Spinning Up) instead of mtrl's ``log(relu(1 - a²) + 1e-6)``, which is biased
    near |a| = 1. ``noise`` is standard normal, sampled by the caller.
    """
    pre_tanh = mean + log_std.exp() * noise
    gaussian_log_prob = -0.5 * noise.square() - log_std - _HALF_LOG_TWO_PI
    log_det_jacobian = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return torch.tanh(pre_tanh), (gaussian_log_prob - log_det_jacobian).sum(dim=-1)


class CriticOutput(NamedTuple):
    q1: Tensor  # [B]
    q2: Tensor  # [B]
    representation: Tensor  # [B, 2 * hidden_dim]: z of Q1 and z of Q2, concatenated


class TwinCritic(_TaskSpecificNames):
    """The two Q networks of SAC (clipped double Q, Fujimoto et al., 2018), as mtrl's Critic.

    Both Q networks read the same task conditioning. With ``task_encoder`` the
    critic owns the agent's one ``TaskEncoder`` (mtrl trains it with the critic
    loss only); ``encode`` gives the encoding the actor and the target critic read.
    The representation is the concatenation [z₁, z₂] of the two trunks' outputs,
    split again for the two output layers, so that the losses of both Q values
    flow through the one tensor NTKMTL-SR differentiates.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_tasks: int,
        arch: str = "task_encoder",
        hidden_dim: int = 400,
        num_layers: int = 3,
        task_embedding_dim: int = 50,
        head_layers: int = 1,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.conditioning = TaskConditioning(arch, num_tasks, task_embedding_dim)
        self.task_encoder = (
            TaskEncoder(
                num_tasks,
                embedding_dim=task_embedding_dim,
                hidden_dim=task_embedding_dim,
                output_dim=task_embedding_dim,
            )
            if self.conditioning.needs_encoding
            else None
        )
        input_dim = obs_dim + action_dim + self.conditioning.dim
        self.q1 = TaskMLP(arch, num_tasks, input_dim, 1, hidden_dim, num_layers, head_layers)
        self.q2 = TaskMLP(arch, num_tasks, input_dim, 1, hidden_dim, num_layers, head_layers)
        self._collect_task_specific()

    def encode(self, task_ids: Tensor) -> Tensor | None:
        """The task encoding [B, E] of the critic's TaskEncoder (None without one)."""
        return None if self.task_encoder is None else self.task_encoder(task_ids)

    @property
    def representation_dim(self) -> int:
        """The width of z = [z₁, z₂]."""
        return 2 * self.hidden_dim

    def forward(
        self, obs: Tensor, action: Tensor, task_ids: Tensor, task_encoding: Tensor | None = None,
        representation_offset: Tensor | None = None,
    ) -> CriticOutput:
        """``task_encoding`` [B, E] replaces the critic's own encoding (``task_encoder`` only):
        the actor loss and the TD target pass the detached encoding, as mtrl does.
        ``representation_offset`` [B, 2h]: as ``Actor.forward``'s."""
        if task_encoding is None and self.task_encoder is not None:
            task_encoding = self.task_encoder(task_ids)
        inputs = self.conditioning(torch.cat([obs, action], dim=-1), task_ids, task_encoding)
        representation = torch.cat(
            [self.q1.trunk(inputs, task_ids), self.q2.trunk(inputs, task_ids)], dim=-1
        )  # [B, 2h]
        if representation_offset is not None:
            representation = representation + representation_offset
        z1, z2 = representation.split(self.hidden_dim, dim=-1)
        q1 = self.q1.head(z1, task_ids).squeeze(-1)
        q2 = self.q2.head(z2, task_ids).squeeze(-1)
        return CriticOutput(q1, q2, representation)
