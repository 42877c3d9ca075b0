"""Test-session settings that must be in place before torch is imported."""

import os

# OpenMP threads that spin while waiting make torch's CPU kernels 10-100x slower when the
# cores are shared (by Meta-World workers, other jobs, CI neighbours); see run_mt10.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
