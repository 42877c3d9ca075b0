"""S agents trained side by side: one update over a leading seed axis.

A seed group holds S ordinary ``MultiTaskSAC`` agents (one per seed, each with its
own networks, optimisers, combiners, temperature, guard counters and noise
generator) whose state tensors are views of stacked [S, ...] tensors. Each
agent still acts, evaluates, saves and loads its own state exactly as a single
run's agent does (``state_dict`` reads its views, ``load_state_dict`` copies into
them); the update of all S agents is one call of the single-seed
``MultiTaskSAC.update_graph`` under ``torch.func.vmap`` over the seed axis, so its
number of ops (one kernel launch each on a GPU) does not grow with S.

How the vmap reaches the agent's state: ``TensorSites`` finds every reference to
a state tensor in the agent's object graph (module parameters, the engines'
parameter dicts, the optimisers' lists, the combiners' and the guard's
attributes); for the duration of the vmapped call the first agent (the
*template*) has those references bound to the batched slices of the stacked
tensors, and its in-place updates write through to all S seeds at once. Inside
the call ``mtrl_ntk.foreach.seed_axis`` switches the multi-tensor kernels (which
vmap cannot batch) to one op per tensor, and ``torch.autograd.grad`` to its
``torch.func`` form. With ``compile=True`` the vmapped update is compiled as one
graph, as a single agent's is (``mtrl_ntk.compilation``).

Seed k's update depends on seed k alone: its batch, its policy noise and its
combiners' random numbers come from its own generators, drawn eagerly before the
call (2 to 4 small draws per seed, the only per-update work that grows with S),
and a non-finite update of seed k is skipped for seed k only (the guard works
per seed). Batched kernels round differently from single-seed ones, so a seed
trained in a group matches the same seed trained alone to float32 rounding, not
bit for bit.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtrl_ntk import foreach
from mtrl_ntk.agent.sac import BatchLike, MultiTaskSAC
from mtrl_ntk.compilation import MaybeCompiled, begin_captured_step, capture_mode

_LEAVES = (
    str, bytes, int, float, bool, complex, type(None), type, enum.Enum, torch.device,
    torch.dtype, torch.Generator, types.FunctionType, types.MethodType,
    types.BuiltinFunctionType, types.ModuleType, MaybeCompiled,
)


class TensorSites:
    """Every reference to ``tensors`` in the object graph under ``root``, to rebind them.

    A reference is an attribute of an object (``vars``), an item of a dict (an
    ``nn.Module``'s ``_parameters`` included) or of a list. Tensors held in a tuple or
    a set cannot be rebound: finding one there is an error, as is a tensor with no
    reference at all.
    """

    def __init__(self, root: object, tensors: Sequence[Tensor]) -> None:
        index = {id(tensor): position for position, tensor in enumerate(tensors)}
        if len(index) != len(tensors):
            raise ValueError("the state tensors must be distinct objects")
        self.count = len(tensors)
        self.sites: list[tuple[Any, Any, bool, int]] = []  # (holder, key, is_attribute, index)
        self._walk(root, index, set())
        found = {site[3] for site in self.sites}
        missing = sorted(set(range(self.count)) - found)
        if missing:
            raise ValueError(
                f"state tensors {missing} are not referenced from {type(root).__name__}"
            )

    def _walk(self, holder: object, index: dict[int, int], seen: set[int]) -> None:
        if isinstance(holder, (Tensor, *_LEAVES)) or id(holder) in seen:
            return
        seen.add(id(holder))
        if isinstance(holder, dict):
            items, is_attribute = list(holder.items()), False
        elif isinstance(holder, list):
            items, is_attribute = list(enumerate(holder)), False
        elif isinstance(holder, (tuple, set, frozenset)):
            for value in holder:
                if isinstance(value, Tensor) and id(value) in index:
                    raise TypeError(f"a state tensor is held in a {type(holder).__name__}")
                self._walk(value, index, seen)
            return
        elif hasattr(holder, "__dict__"):
            items, is_attribute = list(vars(holder).items()), True
        else:
            return
        for key, value in items:
            if isinstance(value, Tensor):
                if id(value) in index:
                    self.sites.append((holder, key, is_attribute, index[id(value)]))
            else:
                self._walk(value, index, seen)

    def current(self) -> list[Tensor]:
        """The tensor each state slot refers to now."""
        values: list[Tensor | None] = [None] * self.count
        for holder, key, is_attribute, position in self.sites:
            if values[position] is None:
                values[position] = getattr(holder, key) if is_attribute else holder[key]
        return values  # type: ignore[return-value]

    def bind(self, values: Sequence[Tensor]) -> None:
        """Make every reference to state tensor i refer to ``values[i]``."""
        for holder, key, is_attribute, position in self.sites:
            if is_attribute:
                object.__setattr__(holder, key, values[position])
            else:
                holder[key] = values[position]


def _setting_differences(agent: MultiTaskSAC, template: MultiTaskSAC) -> list[str]:
    """Where ``agent``'s settings differ from ``template``'s, as "name: agent's vs template's".

    The settings are what the update reads as Python values rather than from state
    tensors (the config, the combiners' kinds and hyperparameters): under vmap the
    template's serve every seed, so a difference would be ignored without a word.
    """
    differences = [
        f"{field.name}: {getattr(agent.cfg, field.name)!r} vs {getattr(template.cfg, field.name)!r}"
        for field in dataclasses.fields(template.cfg)
        if getattr(agent.cfg, field.name) != getattr(template.cfg, field.name)
    ]
    for role in ("critic", "actor", "alpha"):
        mine, theirs = (_hyperparameters(getattr(a, f"{role}_combiner")) for a in (agent, template))
        if mine != theirs:
            differences.append(f"{role} combiner: {mine} vs {theirs}")
    return differences


def _hyperparameters(combiner: object) -> str:
    """The combiner's kind and its public number and string attributes: ``Name(a=1, b='x')``."""
    values = sorted(
        (name, value) for name, value in vars(combiner).items()
        if isinstance(value, (int, float, str)) and not name.startswith("_")
    )
    return f"{type(combiner).__name__}({', '.join(f'{n}={v!r}' for n, v in values)})"


def _alias(original: Tensor, view: Tensor) -> Tensor:
    """``view`` in the role of ``original``: a Parameter (sharing the view's memory) for one."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(view, requires_grad=original.requires_grad)
    return view


class SeedGroupSAC:
    """S ``MultiTaskSAC`` agents of one configuration, updated as one (see the module doc).

    ``agents[k]`` is seed k's agent, built as for a single run (``compile=False``);
    the group takes over its state tensors. Agents whose settings or state shapes
    differ from agent 0's are refused (a ValueError naming the difference).
    ``compile`` compiles the vmapped update with ``torch.compile(fullgraph=True)``
    (a CUDA graph on CUDA), with an eager fallback.
    """

    def __init__(
        self,
        agents: Sequence[MultiTaskSAC],
        *,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        if not agents:
            raise ValueError("a seed group needs at least one agent")
        self.agents = list(agents)
        template = self.agents[0]
        self.device = template.device
        for seed, agent in enumerate(self.agents[1:], start=1):
            differences = _setting_differences(agent, template)
            if differences:
                raise ValueError(
                    f"agent {seed} of the seed group has other settings than agent 0 "
                    f"({'; '.join(differences)}): the group would run agent 0's for every seed"
                )
        states = [agent._state_tensors() for agent in self.agents]
        for seed, state in enumerate(states[1:], start=1):
            shapes = [(tuple(t.shape), t.dtype, t.device) for t in state]
            expected = [(tuple(t.shape), t.dtype, t.device) for t in states[0]]
            if shapes != expected:
                raise ValueError(
                    f"agent {seed} of the seed group does not have agent 0's state shapes "
                    "(a different configuration?)"
                )
        with torch.no_grad():
            self.stacked = [
                torch.stack([state[i].detach() for state in states]) for i in range(len(states[0]))
            ]
        for seed, (agent, state) in enumerate(zip(self.agents, states)):
            TensorSites(agent, state).bind(
                [_alias(original, stacked[seed]) for original, stacked in zip(state, self.stacked)]
            )
        self._template = template
        self._sites = TensorSites(template, template._state_tensors())
        mode = capture_mode(self.device, compile_backend)
        self._update_fn = MaybeCompiled(
            self.update_graph, "the seed group's SAC update", compile, compile_backend,
            fullgraph=True, mode=mode, static_tensors=self.stacked if compile else (),
        )
        self._act_fn = MaybeCompiled(
            self.act_graph, "the seed group's policy", compile, compile_backend, fullgraph=True,
            mode=mode,
        )

    @property
    def num_seeds(self) -> int:
        return len(self.agents)

    def _vmapped(self, fn: Callable[..., Any], *args: Tensor | None) -> Any:
        """``fn(*args)`` of the template agent, vmapped over the seed axis of the stacked
        state and of every non-None argument."""

        def one_seed(state: list[Tensor], *inputs: Tensor | None) -> Any:
            previous = self._sites.current()
            self._sites.bind(state)
            try:
                return fn(*inputs)
            finally:
                self._sites.bind(previous)

        in_dims = (0, *(None if arg is None else 0 for arg in args))
        return torch.func.vmap(one_seed, in_dims=in_dims, randomness="error")(self.stacked, *args)

    # -- acting ------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool) -> Tensor:
        """Actions [S, T, A] for observations [S, T, D]: each seed's ``act``, in one call."""
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        self._check_seeds(obs.shape[0], "observations")
        noise = None
        if not deterministic:
            noise = torch.stack([agent.draw_action_noise(obs.shape[1]) for agent in self.agents])
        begin_captured_step(self._act_fn, self.device)
        with foreach.seed_axis():
            return self._act_fn(obs, noise)

    def act_graph(self, obs: Tensor, noise: Tensor | None) -> Tensor:
        """``MultiTaskSAC.act_with_noise`` of every seed at once (inside ``seed_axis()``)."""
        return self._vmapped(self._template.act_with_noise, obs, noise)

    # -- the update --------------------------------------------------------------------

    def update(self, batches: Sequence[BatchLike]) -> dict[str, Tensor]:
        """One update of every seed on its own batch (``batches[k]`` for seed k); returns the
        metrics of ``MultiTaskSAC.update_graph`` with a leading seed axis [S, ...]."""
        self._check_seeds(len(batches), "batches")
        stacked = [
            torch.stack([getattr(batch, field) for batch in batches])
            for field in ("obs", "action", "reward", "next_obs", "done")
        ]
        num_tasks, per_task = batches[0].reward.shape
        draws = [agent.draw_update_random(num_tasks, per_task) for agent in self.agents]
        noise = torch.stack([draw[0] for draw in draws])
        critic_random = _stack_draws([draw[1] for draw in draws])
        actor_random = _stack_draws([draw[2] for draw in draws])
        alpha_random = _stack_draws([draw[3] for draw in draws])
        begin_captured_step(self._update_fn, self.device)
        with foreach.seed_axis():
            return self._update_fn(*stacked, noise, critic_random, actor_random, alpha_random)

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
        """``MultiTaskSAC.update_graph`` of every seed at once: every argument has a leading
        seed axis (call inside ``foreach.seed_axis()``)."""
        return self._vmapped(
            self._template.update_graph, obs, action, reward, next_obs, done, noise,
            critic_random, actor_random, alpha_random,
        )

    def _check_seeds(self, count: int, what: str) -> None:
        if count != self.num_seeds:
            raise ValueError(f"{count} {what} for a group of {self.num_seeds} seeds")


def _stack_draws(draws: list[Tensor | None]) -> Tensor | None:
    """The seeds' ``draw_random`` outputs stacked [S, ...] (None when the combiner draws none)."""
    if all(draw is None for draw in draws):
        return None
    if any(draw is None for draw in draws):
        raise ValueError("some seeds' combiners drew random numbers and others did not")
    return torch.stack(draws)  # type: ignore[arg-type]
