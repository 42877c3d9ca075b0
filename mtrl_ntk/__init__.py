"""mtrl_ntk: multi-task SAC on Meta-World with NTKMTL and other gradient combiners."""

__version__ = "0.1.0"
