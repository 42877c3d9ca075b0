"""Train one multi-task SAC agent on Meta-World (MT10 by default) with a gradient combiner.

    python run_mt10.py combiner=ntkmtl seed=0          # one paper-scale run
    python run_mt10.py combiner=ntkmtl seed=0..9       # ten seeds side by side in one process
    python run_mt10.py experiment=smoke combiner=ls    # the same code, small, in under a minute
    python run_mt10.py combiner=ntkmtl seed=0 resume=true  # continue a killed run

Configs live in ``configs/`` (one flat YAML per combiner, env, protocol, agent
and experiment preset). Invalid input stops before any environment starts, with
one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting make torch's CPU kernels 10-100x slower when the
# cores are shared (with the environment workers, or with other jobs): a tiny SAC update
# went from 10 ms to 380 ms on a loaded 2-core machine. Sleeping waits cost nothing
# measurable when the cores are free. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtrl_ntk.config import ConfigError, prepare_argv

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXIT_INVALID_CONFIG = 2

# The command line as the user typed it (before ``seed=0..9`` is rewritten), for provenance.
_TYPED_ARGV: list[str] = list(sys.argv)


def _fail(error: ConfigError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_INVALID_CONFIG)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> float:
    """One Hydra job: train, and return the final mean evaluation success (for sweepers)."""
    from mtrl_ntk.errors import RunStopped
    from mtrl_ntk.trainer import train  # heavy imports only once the command line is valid

    try:
        result = train(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir), argv=_TYPED_ARGV)
    except ConfigError as error:
        _fail(error)
    except RunStopped as error:  # interrupted, too many non-finite updates, a dead worker, ...
        print(f"mtrl_ntk: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    return float(result["eval/success_mean"])


def main() -> None:
    try:
        argv = prepare_argv(sys.argv[1:], CONFIG_DIR)
    except ConfigError as error:
        _fail(error)
    sys.argv = [sys.argv[0], *argv]
    run()


if __name__ == "__main__":
    main()
