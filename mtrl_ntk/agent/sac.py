"""Multi-task SAC whose critic and actor updates go through the task-gradient engine.

One update on a batch grouped [T, B_t] (Haarnoja et al., 2018; the multi-task
semantics of mtrl, Sodhani et al., 2021):

1. TD target, without gradient: y = r + γ (1 - done) (min_k Q̄_k(s', a') - α_task log π(a'|s')),
   a' ~ π(·|s'), Q̄ the Polyak-averaged target critic.
2. Critic: per-sample loss (Q₁(s, a) - y)² + (Q₂(s, a) - y)² (mtrl's sum of two
   MSEs), per-task losses balanced by the critic combiner.
3. Actor, against the updated critic with its parameters detached: per-sample
   loss α_task log π(ã|s) - min_k Q_k(s, ã), ã = tanh(μ + σ ε), balanced by the
   actor combiner.
4. Temperature (mtrl / CleanRL form): per-sample loss α_task (-log π(ã|s) - H̄),
   H̄ = -|A|, with log π from the actor before its step; per-task losses balanced by
   the temperature combiner (the mean over tasks unless ``"alpha"`` is in
   ``AgentConfig.balance``).
5. Target critic: θ̄ ← (1 - τ) θ̄ + τ θ.

With ``arch=task_encoder`` (mtrl's semantics): the one task encoder belongs to the
critic and is trained by the critic loss only. Its encoding of the T tasks is
computed once per update, before the critic's step, and read detached by the TD
target (actor and target critic), the actor loss (actor and critic) and the
temperature's log π, as mtrl's ``update`` computes ``task_encoding`` once and
detaches it for every component not in ``losses_to_train`` (mtrl steps the
encoder's optimiser at the end of the update; the encoder here steps with the
critic, which no later stage can tell apart since they read the earlier encoding).

Each of steps 2, 3 and 4 is ``engine.backward(loss_fn, batch, combiner)`` ->
``optimizer.step()`` -> ``engine.after_step(...)``: the engine computes exactly
what the combiner declares it needs and writes ``.grad``; nothing here depends on
which combiner runs. A loss not listed in ``AgentConfig.balance`` gets the ``ls``
combiner (the mean over tasks, plain multi-task SAC) through the same path.

The Gaussian noise of both policy samples is drawn before the engine runs (the
loss functions must be RNG-free for ``torch.func.vmap``) from the agent's own
generator, whose state is part of ``state_dict`` so that a restored agent makes
the identical next update.

The update is shaped for a GPU: ``update`` draws this update's random numbers
(the policy noise, and whatever a combiner draws in ``draw_random``) eagerly and
then runs ``update_graph``, a function of the batch and those numbers with static
shapes and no host synchronisation: the optimisers are ``CapturableAdam`` (device
step counts and learning rates), and the non-finite guard is on the device (AMP's
found-inf logic): a stage whose losses or gradients are not finite is not applied,
``health`` counts the skips, and the host reads them at log time. With
``compile=True`` ``update_graph`` is compiled as one graph
(``torch.compile(fullgraph=True)``) and, on CUDA, captured as one CUDA graph
(``mode="reduce-overhead"``); eager execution is the reference and the fallback
(``mtrl_ntk.compilation``).

What a non-finite update skips (the guard's semantics): a non-finite critic pass
skips every step of the update (critic, target, actor, temperature, both
combiners' state); a non-finite actor pass skips the actor's, the temperature's
and the actor combiner's; a non-finite temperature loss skips the temperature's.
A stage that was applied used only finite values computed before the skipped
one, as AMP's gradient scaler skips one optimiser and not the others.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtrl_ntk import foreach
from mtrl_ntk.agent.models import Actor, TwinCritic, check_architecture, tanh_gaussian_sample
from mtrl_ntk.combiners.base import GradientCombiner, Need, make_combiner
from mtrl_ntk.compilation import MaybeCompiled, begin_captured_step, capture_mode
from mtrl_ntk.engine import EngineResult, TaskGradientEngine
from mtrl_ntk.optim import CapturableAdam

BALANCEABLE_LOSSES = ("critic", "actor", "alpha")


class BatchLike(Protocol):
    """A replay batch grouped by task (``mtrl_ntk.replay.Batch``)."""

    obs: Tensor  # [T, B_t, D]
    action: Tensor  # [T, B_t, A]
    reward: Tensor  # [T, B_t]
    next_obs: Tensor  # [T, B_t, D]
    done: Tensor  # [T, B_t], 1.0 for terminal transitions (not for time-limit ends)


@dataclass(frozen=True)
class AgentConfig:
    """Multi-task SAC settings; the defaults are mtrl's MT10 settings (docs/design.md).

    ``balance`` lists the losses whose per-task terms go through the combiners
    given to ``MultiTaskSAC`` (``critic``, ``actor``, ``alpha``: the temperature's);
    the others are averaged over tasks (``ls``). mtrl's gradient-manipulation agents
    (``grad_manipulation.py``: PCGrad, and CAGrad's, Nash-MTL's and FairGrad's
    subclasses) pass all three through the method.
    ``disentangled_alpha`` learns one temperature per task (mtrl's option); None
    (the default) means one per task for ``independent`` (T single-task SACs, each
    with its own temperature) and one shared temperature for every other
    architecture. The resolved value replaces None when the config is built.
    """

    arch: str = "task_encoder"
    hidden_dim: int = 400
    num_layers: int = 3
    head_layers: int = 1
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    init_temperature: float = 1.0
    disentangled_alpha: bool | None = None
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    task_embedding_dim: int = 50
    balance: tuple[str, ...] = ("critic", "actor")

    def __post_init__(self) -> None:
        check_architecture(self.arch)
        if self.disentangled_alpha is None:
            object.__setattr__(self, "disentangled_alpha", self.arch == "independent")
        if not isinstance(self.balance, tuple):
            object.__setattr__(self, "balance", tuple(self.balance))
        _check(all(name in BALANCEABLE_LOSSES for name in self.balance)
               and len(set(self.balance)) == len(self.balance),
               "balance", self.balance, f"distinct names among {BALANCEABLE_LOSSES}")
        for name in ("hidden_dim", "num_layers", "head_layers", "task_embedding_dim"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   name, value, "an integer >= 1")
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_temperature"):
            value = getattr(self, name)
            _check(_is_real(value) and value > 0, name, value, "a number > 0")
        _check(_is_real(self.gamma) and 0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        _check(_is_real(self.tau) and 0 < self.tau <= 1, "tau", self.tau, "in (0, 1]")
        _check(isinstance(self.disentangled_alpha, bool), "disentangled_alpha",
               self.disentangled_alpha, "a bool")
        _check(_is_real(self.log_std_min) and _is_real(self.log_std_max)
               and self.log_std_min < self.log_std_max,
               "log_std_max", self.log_std_max, f"a number > log_std_min ({self.log_std_min})")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid value {value!r} for agent setting {name!r}: expected {allowed}")


class Temperature(nn.Module):
    """SAC's learned temperature: ``log_alpha`` [T] (one per task) or [1] (one shared).

    ``forward(task_ids [B])`` is the per-sample log α [B]. With one per task, entry i
    belongs to task i alone (``is_task_specific``): the engine keeps it out of the
    Gramian, as the heads of ``multihead``; the shared one is a shared parameter.
    """

    def __init__(self, num_tasks: int, disentangled: bool, init_temperature: float) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(
            torch.full((num_tasks if disentangled else 1,), math.log(init_temperature))
        )

    def is_task_specific(self, name: str) -> bool:
        return self.log_alpha.shape[0] > 1

    def forward(self, task_ids: Tensor) -> Tensor:
        if self.log_alpha.shape[0] == 1:
            return self.log_alpha.expand(task_ids.shape)
        return self.log_alpha.index_select(0, task_ids)


def _flatten_tasks(tensor: Tensor) -> Tensor:
    """[T, B_t, ...] -> [T * B_t, ...] (task-major: task i's samples stay contiguous)."""
    return tensor.reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])


class MultiTaskSAC:
    """Multi-task SAC (actor, twin critic, Polyak targets, learned temperature).

    ``critic_combiner``, ``actor_combiner`` and ``alpha_combiner`` (the temperature's)
    are separate instances (each keeps its own state); each is replaced by ``ls`` when
    its loss is not in ``cfg.balance``. ``alpha_combiner=None`` builds a fresh instance
    of the actor combiner's kind and hyperparameters. Methods defined only for positive
    losses (``needs_positive_losses``) stay off the actor and temperature losses, which
    can be negative. ``seed`` seeds the generator of the policy noise.
    ``compile`` compiles ``update_graph`` as one graph (a CUDA graph on CUDA; see
    the module docstring) with ``torch.compile``'s ``compile_backend`` (tests use
    ``aot_eager``, which skips code generation); the result is the same update up
    to floating-point rounding.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_tasks: int,
        cfg: AgentConfig,
        critic_combiner: GradientCombiner,
        actor_combiner: GradientCombiner,
        device: torch.device | str,
        *,
        alpha_combiner: GradientCombiner | None = None,
        seed: int = 0,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        self.device = torch.device(device)
        self.compile = compile
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.action_dim = action_dim
        self.target_entropy = -float(action_dim)
        if alpha_combiner is None:  # built only when used (building may draw from torch's RNG)
            alpha_combiner = (
                make_combiner(actor_combiner.name, num_tasks, **actor_combiner.hyperparameters())
                if "alpha" in cfg.balance
                else make_combiner("ls", num_tasks)
            )
        roles = (("critic", critic_combiner), ("actor", actor_combiner), ("alpha", alpha_combiner))
        for role, combiner in roles:
            if combiner.num_tasks != num_tasks:
                raise ValueError(
                    f"the {role} combiner {combiner.name!r} was built for {combiner.num_tasks} "
                    f"tasks, the agent has {num_tasks}"
                )
        self.critic_combiner = (
            critic_combiner if "critic" in cfg.balance else make_combiner("ls", num_tasks)
        )
        # The actor loss α log π - Q is often negative: methods defined only for positive
        # losses (FAMO, SI, UW, DWA, MoCo) balance the critic only, as FAMO's authors do on
        # MT10, and the actor gets the plain mean.
        actor_balanced = "actor" in cfg.balance and not actor_combiner.needs_positive_losses
        self.actor_combiner = (
            actor_combiner if actor_balanced else make_combiner("ls", num_tasks)
        )
        # The temperature loss α (-log π - H̄) changes sign with the entropy: the same rule.
        alpha_balanced = "alpha" in cfg.balance and not alpha_combiner.needs_positive_losses
        self.alpha_combiner = (
            alpha_combiner if alpha_balanced else make_combiner("ls", num_tasks)
        )
        if Need.REPRESENTATION_NTK in self.alpha_combiner.need:
            raise ValueError(
                f"combiner {alpha_combiner.name!r} needs a shared representation, which the "
                "temperature loss does not have: leave 'alpha' out of agent.balance"
            )

        self.actor = Actor(
            obs_dim, action_dim, num_tasks, arch=cfg.arch, hidden_dim=cfg.hidden_dim,
            num_layers=cfg.num_layers, log_std_min=cfg.log_std_min,
            log_std_max=cfg.log_std_max, task_embedding_dim=cfg.task_embedding_dim,
            head_layers=cfg.head_layers,
        ).to(self.device)
        self.critic = TwinCritic(
            obs_dim, action_dim, num_tasks, arch=cfg.arch, hidden_dim=cfg.hidden_dim,
            num_layers=cfg.num_layers, task_embedding_dim=cfg.task_embedding_dim,
            head_layers=cfg.head_layers,
        ).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # One temperature per task (disentangled) or one shared by all tasks.
        self.temperature = Temperature(
            num_tasks, cfg.disentangled_alpha, cfg.init_temperature
        ).to(self.device)
        self.log_alpha = self.temperature.log_alpha

        for combiner in (self.critic_combiner, self.actor_combiner, self.alpha_combiner):
            combiner.to(self.device)
        self.actor_optimizer = CapturableAdam(list(self.actor.parameters()), cfg.actor_lr)
        self.critic_optimizer = CapturableAdam(list(self.critic.parameters()), cfg.critic_lr)
        self.alpha_optimizer = CapturableAdam([self.log_alpha], cfg.alpha_lr)
        self.critic_engine = TaskGradientEngine(
            self.critic, num_tasks, self.critic.is_task_specific
        )
        self.actor_engine = TaskGradientEngine(self.actor, num_tasks, self.actor.is_task_specific)
        self.alpha_engine = TaskGradientEngine(
            self.temperature, num_tasks, self.temperature.is_task_specific
        )
        # State whose shape depends on d is allocated now, so that _state_tensors is complete.
        self.critic_combiner.prepare(self.critic_engine.shared_dim, self.device)
        self.actor_combiner.prepare(self.actor_engine.shared_dim, self.device)
        self.alpha_combiner.prepare(self.alpha_engine.shared_dim, self.device)
        self.health = UpdateHealth(num_tasks, self.device)
        # The same function objects at every update, so that compiled code is reused.
        self._critic_loss_fn = self.critic_loss
        self._actor_loss_fn = self.actor_loss_against_critic
        self._alpha_loss_fn = self.temperature_loss
        mode = capture_mode(self.device, compile_backend)
        self._update_fn = MaybeCompiled(
            self.update_graph, "the SAC update", compile, compile_backend, fullgraph=True,
            mode=mode, static_tensors=self._state_tensors() if compile else (),
        )
        # The policy of every environment step (and evaluation step): one graph too.
        self._act_fn = MaybeCompiled(
            self.act_with_noise, "the policy", compile, compile_backend, fullgraph=True, mode=mode
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def task_encoding(self, task_ids: Tensor) -> Tensor | None:
        """The critic's task encoding of ``task_ids`` [...], detached: [..., E] (or None).

        What the actor, the target critic and the actor loss's critic read
        (``arch=task_encoder``); None for every other architecture.
        """
        if self.critic.task_encoder is None:
            return None
        with torch.no_grad():
            flat = self.critic.encode(task_ids.reshape(-1))
        return flat.view(*task_ids.shape, -1)

    def _state_tensors(self) -> list[Tensor]:
        """Every tensor the update changes in place (their addresses stay fixed)."""
        tensors = [*self.actor.parameters(), *self.critic.parameters(),
                   *self.critic_target.parameters(), self.log_alpha]
        for optimizer in (self.actor_optimizer, self.critic_optimizer, self.alpha_optimizer):
            tensors += optimizer.state_tensors()
        for combiner in (self.critic_combiner, self.actor_combiner, self.alpha_combiner):
            tensors += combiner.state_tensors()
        return tensors + self.health.state_tensors()

    # -- acting ------------------------------------------------------------------------

    @property
    def alpha(self) -> Tensor:
        """The temperature of every task, [T] (detached)."""
        return self.log_alpha.detach().exp().expand(self.num_tasks)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool) -> Tensor:
        """Actions [T, A] for one observation per task (row i = task i): tanh(μ) or a sample."""
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        noise = None if deterministic else self.draw_action_noise(obs.shape[0])
        begin_captured_step(self._act_fn, self.device)
        return self._act_fn(obs, noise)

    def draw_action_noise(self, num_tasks: int) -> Tensor:
        """The Gaussian noise [T, A] of one stochastic ``act``, from the agent's generator."""
        return torch.randn(
            (num_tasks, self.action_dim), generator=self.generator, device=self.device
        )

    @torch.no_grad()
    def act_with_noise(self, obs: Tensor, noise: Tensor | None) -> Tensor:
        """``act`` with its Gaussian noise [T, A] given (None: deterministic), RNG-free."""
        task_ids = torch.arange(obs.shape[0], device=self.device)
        mean, log_std, _ = self.actor(obs, task_ids, self.task_encoding(task_ids))
        if noise is None:
            return torch.tanh(mean)
        action, _ = tanh_gaussian_sample(mean, log_std, noise)
        return action

    # -- the loss functions the engine differentiates (vmap-compatible) ------------------

    def critic_loss(
        self, params: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Per-sample (Q₁ - y)² + (Q₂ - y)² [B] and the critic's representation [B, 2h]."""
        q1, q2, representation = functional_call(
            self.critic, params, (batch["obs"], batch["action"], batch["task_ids"]),
            {"representation_offset": batch.get("representation_offset")},
        )
        target = batch["target_q"]
        return (q1 - target).square() + (q2 - target).square(), representation

    def actor_loss(
        self,
        critic_params: dict[str, Tensor],
        params: dict[str, Tensor],
        batch: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Per-sample α_task log π(ã|s) - min_k Q_k(s, ã) [B] and the actor's representation.

        ``critic_params`` are detached, so only the actor receives gradients; with
        ``task_encoder`` actor and critic read ``batch["task_encoding"]`` (detached),
        so the actor loss leaves the task encoder untouched (mtrl's semantics).
        """
        encoding = batch.get("task_encoding")
        mean, log_std, representation = functional_call(
            self.actor, params, (batch["obs"], batch["task_ids"], encoding),
            {"representation_offset": batch.get("representation_offset")},
        )
        action, log_prob = tanh_gaussian_sample(mean, log_std, batch["noise"])
        q1, q2, _ = functional_call(
            self.critic, critic_params, (batch["obs"], action, batch["task_ids"], encoding)
        )
        return batch["alpha"] * log_prob - torch.minimum(q1, q2), representation

    def actor_loss_against_critic(
        self, params: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``actor_loss`` against the critic's current parameters, detached.

        One function object for every update (unlike a closure over the critic's
        parameters), as ``torch.compile`` needs to reuse its code.
        """
        critic_params = {name: param.detach() for name, param in self.critic.named_parameters()}
        return self.actor_loss(critic_params, params, batch)

    def temperature_loss(
        self, params: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[Tensor, None]:
        """Per-sample α_task (-log π(ã|s) - H̄) [B]; ``batch["entropy_gap"]`` holds the
        detached -log π - H̄ (mtrl's ``(-log_pi - target_entropy).detach()``)."""
        log_alpha = functional_call(self.temperature, params, (batch["task_ids"],))
        return log_alpha.exp() * batch["entropy_gap"], None

    # -- one update ----------------------------------------------------------------------

    @torch.no_grad()
    def td_target(
        self, reward: Tensor, next_obs: Tensor, done: Tensor, task_ids: Tensor, noise: Tensor,
        task_encoding: Tensor | None = None,
    ) -> Tensor:
        """y = r + γ (1 - done) (min_k Q̄_k(s', a') - α_task log π(a'|s')), [T, B_t].

        ``task_encoding`` [T, B_t, E] (``task_encoder``): the online critic's encoding,
        read by the actor and by the target critic, as in mtrl (whose target critic
        has no task encoder of its own).
        """
        num_tasks, per_task = reward.shape
        flat_ids = _flatten_tasks(task_ids)
        next_obs = _flatten_tasks(next_obs)
        encoding = None if task_encoding is None else _flatten_tasks(task_encoding)
        mean, log_std, _ = self.actor(next_obs, flat_ids, encoding)
        next_action, next_log_prob = tanh_gaussian_sample(mean, log_std, _flatten_tasks(noise))
        q1, q2, _ = self.critic_target(next_obs, next_action, flat_ids, encoding)
        alpha = self.alpha[flat_ids]  # [T * B_t]
        next_value = (torch.minimum(q1, q2) - alpha * next_log_prob).view(num_tasks, per_task)
        return reward + self.cfg.gamma * (1.0 - done) * next_value

    @torch.no_grad()
    def policy_log_prob(
        self, obs: Tensor, task_ids: Tensor, noise: Tensor, task_encoding: Tensor | None = None
    ) -> Tensor:
        """log π(ã|s) [T, B_t] of the samples ã = tanh(μ + σ ε) for obs [T, B_t, D]."""
        num_tasks, per_task = task_ids.shape
        encoding = None if task_encoding is None else _flatten_tasks(task_encoding)
        mean, log_std, _ = self.actor(_flatten_tasks(obs), _flatten_tasks(task_ids), encoding)
        _, log_prob = tanh_gaussian_sample(mean, log_std, _flatten_tasks(noise))
        return log_prob.view(num_tasks, per_task)

    def update(self, batch: BatchLike) -> dict[str, Tensor]:
        """One SAC update on a batch grouped [T, B_t]; returns detached metrics (no host sync).

        Draws the update's random numbers, then runs ``update_graph`` (compiled when
        the agent was built with ``compile=True``).
        """
        num_tasks, per_task = batch.reward.shape
        if num_tasks != self.num_tasks:
            raise ValueError(f"batch has {num_tasks} tasks, the agent has {self.num_tasks}")
        noise, critic_random, actor_random, alpha_random = self.draw_update_random(
            num_tasks, per_task
        )
        # The previous replay's outputs (the metrics, already added into the trainer's sums)
        # may be overwritten.
        begin_captured_step(self._update_fn, self.device)
        return self._update_fn(
            batch.obs, batch.action, batch.reward, batch.next_obs, batch.done,
            noise, critic_random, actor_random, alpha_random,
        )

    def draw_update_random(
        self, num_tasks: int, per_task: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """One update's random numbers, from the agent's own generators: the policy noise
        [2, T, B_t, A] and the three combiners' ``draw_random`` (critic, actor, temperature;
        None when one draws none)."""
        noise = torch.randn(
            (2, num_tasks, per_task, self.action_dim), generator=self.generator, device=self.device
        )
        critic_random = self.critic_combiner.draw_random(self.critic_engine.shared_dim, self.device)
        actor_random = self.actor_combiner.draw_random(self.actor_engine.shared_dim, self.device)
        alpha_random = self.alpha_combiner.draw_random(self.alpha_engine.shared_dim, self.device)
        return noise, critic_random, actor_random, alpha_random

    def update_graph(
        self,
        obs: Tensor,
        action: Tensor,
        reward: Tensor,
        next_obs: Tensor,
        done: Tensor,
        noise: Tensor,
        critic_random: Tensor | None,
        actor_random: Tensor | None,
        alpha_random: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The whole update as a function of the batch and its random numbers.

        Static shapes, no host reads: this is what ``compile=True`` compiles as one
        graph. ``noise`` [2, T, B_t, A] is the policy noise of the TD target and of
        the actor loss; ``*_random`` are the combiners' ``draw_random`` outputs.

        Metrics: ``critic_loss``, ``actor_loss``, ``alpha_loss``, ``entropy`` (scalars,
        entropy = -mean log π), ``alpha`` ([T] with disentangled_alpha, else a
        scalar), ``critic_task_losses`` / ``actor_task_losses`` / ``task_entropy``
        [T], ``critic_weights`` / ``actor_weights`` [T] (when the combiner returns
        weights), ``critic_ntk_eigenvalues`` / ``actor_ntk_eigenvalues`` [T] (when
        the combiner reports them), ``alpha_weights``, ``alpha_conflicting_pairs`` and
        ``alpha_solver_fallback`` (when ``"alpha"`` is balanced), ``critic_gramian`` /
        ``actor_gramian`` [T, T]
        and ``critic_conflicting_pairs`` / ``actor_conflicting_pairs`` (when the
        engine formed the Gramian), ``*_solver_fallback`` (when the combiner has a
        solver), and ``finite`` (bool: the whole update was applied). Every metric
        but ``finite`` is 0 for an update that was not applied (so that averages
        over updates only count applied ones); ``health`` keeps what went wrong.
        """
        num_tasks, per_task = reward.shape
        task_ids = torch.arange(num_tasks, device=self.device).unsqueeze(1).expand(
            num_tasks, per_task
        )  # [T, B_t]
        next_noise, noise = noise[0], noise[1]
        alpha = self.alpha  # [T], before this update's temperature step
        critic_state = _snapshot(self.critic_combiner.state_tensors())
        actor_state = _snapshot(self.actor_combiner.state_tensors())
        alpha_state = _snapshot(self.alpha_combiner.state_tensors())
        # task_encoder: the encoding before the critic's step, detached (mtrl's semantics).
        encoding = self.task_encoding(task_ids)  # [T, B_t, E] or None

        # Critic.
        critic_batch = {
            "obs": obs,
            "action": action,
            "task_ids": task_ids,
            "target_q": self.td_target(reward, next_obs, done, task_ids, next_noise, encoding),
        }
        critic_result = self._step(
            self.critic_engine, self.critic_optimizer, self._critic_loss_fn, critic_batch,
            self.critic_combiner, critic_random, apply=None,
        )
        critic_ok = critic_result.finite
        self.update_target(critic_ok)

        # Actor, against the critic just updated.
        actor_batch = {
            "obs": obs,
            "task_ids": task_ids,
            "noise": noise,
            "alpha": alpha.unsqueeze(1).expand(num_tasks, per_task),
        }
        if encoding is not None:
            actor_batch["task_encoding"] = encoding
        # log π of the samples the actor loss uses, before the actor's step: for the temperature.
        log_prob = self.policy_log_prob(obs, task_ids, noise, encoding)  # [T, B_t]
        actor_result = self._step(
            self.actor_engine, self.actor_optimizer, self._actor_loss_fn, actor_batch,
            self.actor_combiner, actor_random, apply=critic_ok,
        )
        actor_ok = critic_ok & actor_result.finite

        # Temperature, per task through its combiner (the mean over tasks unless balanced).
        alpha_batch = {"task_ids": task_ids, "entropy_gap": -log_prob - self.target_entropy}
        alpha_result = self._step(
            self.alpha_engine, self.alpha_optimizer, self._alpha_loss_fn, alpha_batch,
            self.alpha_combiner, alpha_random, apply=actor_ok,
        )
        alpha_loss = alpha_result.losses.mean()
        applied = actor_ok & alpha_result.finite

        # A skipped stage leaves its combiner's state as it was.
        _restore_where_not(critic_ok, self.critic_combiner.state_tensors(), critic_state)
        _restore_where_not(actor_ok, self.actor_combiner.state_tensors(), actor_state)
        _restore_where_not(applied, self.alpha_combiner.state_tensors(), alpha_state)
        self.health.record(applied, critic_result.losses, actor_result.losses, alpha_loss)

        metrics = {
            "critic_loss": critic_result.losses.mean(),
            "actor_loss": actor_result.losses.mean(),
            "alpha_loss": alpha_loss.detach(),
            "alpha": self.alpha if self.cfg.disentangled_alpha else self.alpha[0],
            "entropy": -log_prob.mean(),
            "task_entropy": -log_prob.mean(dim=1),
            "critic_task_losses": critic_result.losses,
            "actor_task_losses": actor_result.losses,
        }
        for role, result in (("critic", critic_result), ("actor", actor_result)):
            metrics.update(_combiner_metrics(role, result))
        if self.alpha_combiner.name != "ls":
            alpha_metrics = _combiner_metrics("alpha", alpha_result)
            alpha_metrics.pop("alpha_gramian", None)  # [T, T] products of scalars: not logged
            metrics.update(alpha_metrics)
        metrics = {key: _zero_unless(applied, value.detach()) for key, value in metrics.items()}
        metrics["finite"] = applied
        return metrics

    def _step(
        self,
        engine: TaskGradientEngine,
        optimizer: CapturableAdam,
        loss_fn: Any,
        batch: dict[str, Tensor],
        combiner: GradientCombiner,
        random: Tensor | None,
        apply: Tensor | None,
    ) -> EngineResult:
        """One engine pass and optimiser step, applied where the pass was finite (and ``apply``)."""
        grads, result = engine.gradients(loss_fn, batch, combiner, random)
        ok = result.finite if apply is None else apply & result.finite
        optimizer.step(grads, ok)
        engine.after_step(loss_fn, batch, combiner)
        return result

    @torch.no_grad()
    def update_target(self, apply: Tensor | None = None) -> None:
        """Polyak averaging θ̄ ← θ̄ + τ (θ - θ̄) of every critic parameter (where ``apply``)."""
        targets = list(self.critic_target.parameters())
        sources = list(self.critic.parameters())
        if apply is None and not foreach.in_seed_axis():
            torch._foreach_lerp_(targets, sources, self.cfg.tau)
            return
        if apply is None:
            apply = torch.ones((), dtype=torch.bool, device=targets[0].device)
        differences = foreach.sub(sources, targets)
        foreach.mul_(differences, self.cfg.tau * apply.to(targets[0].dtype))
        foreach.add_(targets, differences)

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Networks, target critic, temperature, optimisers, the three combiners, the noise RNG."""
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "critic_combiner": self.critic_combiner.state_dict(),
            "actor_combiner": self.actor_combiner.state_dict(),
            "alpha_combiner": self.alpha_combiner.state_dict(),
            "generator": self.generator.get_state(),
            "health": self.health.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        # Checkpoints before the device guard have no health, before the temperature's
        # combiner no alpha_combiner (the temperature was then always averaged: ls).
        if set(state) | {"health", "alpha_combiner"} != expected:
            raise ValueError(
                f"agent state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        if state["log_alpha"].shape != self.log_alpha.shape:
            raise ValueError(
                f"log_alpha has shape {tuple(state['log_alpha'].shape)}, expected "
                f"{tuple(self.log_alpha.shape)} (disentangled_alpha={self.cfg.disentangled_alpha})"
            )
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.critic_combiner.load_state_dict(state["critic_combiner"])
        self.actor_combiner.load_state_dict(state["actor_combiner"])
        if "alpha_combiner" in state:
            self.alpha_combiner.load_state_dict(state["alpha_combiner"])
        self.generator.set_state(state["generator"].cpu())
        if "health" in state:
            self.health.load_state_dict(state["health"])


def _combiner_metrics(role: str, result: EngineResult) -> dict[str, Tensor]:
    """Weights, NTK eigenvalues, the Gramian and its conflicts, the solver's fallback flag."""
    metrics: dict[str, Tensor] = {}
    weights = result.output.weights
    if weights is None:
        weights = result.output.diagnostics.get("weights")
    if weights is not None:
        metrics[f"{role}_weights"] = weights.detach()
    eigenvalues = result.output.diagnostics.get("ntk_eigenvalues")
    if eigenvalues is not None:
        metrics[f"{role}_ntk_eigenvalues"] = eigenvalues.detach()
    if result.gramian is not None:
        metrics[f"{role}_gramian"] = result.gramian.detach()
        # Pairs of tasks whose gradients conflict (G_ij < 0, i < j).
        metrics[f"{role}_conflicting_pairs"] = (result.gramian < 0).triu(diagonal=1).sum()
    # 1.0 when the solver could not reach its method's optimum and fell back.
    fallback = result.output.diagnostics.get("solver_fallback")
    if isinstance(fallback, Tensor):
        metrics[f"{role}_solver_fallback"] = fallback.detach()
    return metrics


def _zero_unless(applied: Tensor, value: Tensor) -> Tensor:
    """``value`` (floating point) where ``applied``, else 0."""
    if not value.is_floating_point():
        value = value.float()
    return torch.where(applied, value, torch.zeros((), dtype=value.dtype, device=value.device))


def _snapshot(tensors: list[Tensor]) -> list[Tensor]:
    return [tensor.detach().clone() for tensor in tensors]


@torch.no_grad()
def _restore_where_not(applied: Tensor, tensors: list[Tensor], saved: list[Tensor]) -> None:
    """Put ``saved`` back into ``tensors`` (in place) unless ``applied``."""
    for tensor, old in zip(tensors, saved):
        tensor.copy_(torch.where(applied, tensor, old))


class UpdateHealth:
    """Device-side record of the non-finite guard, read by the host at log time.

    ``skipped``: updates not (fully) applied; ``consecutive``: skipped in a row up to
    the last update; ``max_consecutive``: the longest such run since the last
    ``read``; ``last_skip``: the index (count of updates before it) of the last
    skipped update, -1 if none; ``last_losses`` [3, T]: its per-task critic and actor
    losses and its temperature loss (row 2, all columns), to report which task broke.
    ``updates`` counts every update.
    """

    def __init__(self, num_tasks: int, device: torch.device) -> None:
        def counter() -> Tensor:
            return torch.zeros((), dtype=torch.int64, device=device)

        self.updates = counter()
        self.skipped = counter()
        self.consecutive = counter()
        self.max_consecutive = counter()
        self.last_skip = counter() - 1
        self.last_losses = torch.zeros(3, num_tasks, device=device)

    def state_tensors(self) -> list[Tensor]:
        return [self.updates, self.skipped, self.consecutive, self.max_consecutive,
                self.last_skip, self.last_losses]

    @torch.no_grad()
    def record(
        self, applied: Tensor, critic_losses: Tensor, actor_losses: Tensor, alpha_loss: Tensor
    ) -> None:
        skipped = (~applied).to(torch.int64)
        self.skipped.add_(skipped)
        self.consecutive.copy_((self.consecutive + 1) * skipped)
        self.max_consecutive.copy_(torch.maximum(self.max_consecutive, self.consecutive))
        self.last_skip.copy_(torch.where(applied, self.last_skip, self.updates))
        losses = torch.stack([
            critic_losses.float(), actor_losses.float(),
            alpha_loss.float().expand_as(critic_losses),
        ])
        self.last_losses.copy_(torch.where(applied, self.last_losses, losses))
        self.updates.add_(1)

    def read(self) -> dict[str, Any]:
        """The record on the host (one synchronisation); resets ``max_consecutive``."""
        values = {
            "updates": int(self.updates), "skipped": int(self.skipped),
            "consecutive": int(self.consecutive), "max_consecutive": int(self.max_consecutive),
            "last_skip": int(self.last_skip), "last_losses": self.last_losses.cpu(),
        }
        self.max_consecutive.copy_(self.consecutive)
        return values

    def state_dict(self) -> dict[str, Tensor]:
        """The counters. ``last_losses`` is left out: it holds the non-finite values of a
        skipped update (a checkpoint holds no non-finite value), and the trainer reports
        every skip before it writes a checkpoint."""
        names = ("updates", "skipped", "consecutive", "max_consecutive", "last_skip")
        return {name: getattr(self, name).detach().clone() for name in names}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)
