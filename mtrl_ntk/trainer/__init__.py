"""The top floor: one training loop for S >= 1 seeds (docs/design.md, "Layout").

``entry`` (``train``: config -> run directories -> loop), ``loop`` (the loop and its
hooks), ``seed_run`` (one seed's run and its state), ``learner`` (the agent of one
seed, or the vmapped group of S), ``resume``, ``metrics``.
"""

from mtrl_ntk.trainer.entry import seed_config, train
from mtrl_ntk.trainer.loop import PHASES, LoopObserver, TrainingLoop
from mtrl_ntk.trainer.seed_run import SeedRun, open_seed_runs

__all__ = [
    "PHASES", "LoopObserver", "SeedRun", "TrainingLoop", "open_seed_runs", "seed_config", "train",
]
