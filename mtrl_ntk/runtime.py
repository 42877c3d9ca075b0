"""Process-wide settings for a fast training loop on the CPU (call once, at start-up).

The per-task Jacobian engine allocates and frees tens of megabytes per update
(the critic's Jacobian at T = 10 is 15 MB with one mini-batch per task, 59 MB
with four). With glibc's default malloc those blocks are returned to the kernel
when freed (``mmap``/``munmap``, and heap trimming above a dynamic threshold)
and every update faults them in again, page by page, with the kernel zeroing
each page: measured at paper scale on one CPU thread, 13,000-17,000 minor page
faults and 20-30 ms of system time per critic update for NTKMTL (n = 4) and
GradDrop, 3,500 and 3 ms for LS. Keeping freed memory in the process
(``tune_cpu_allocator``) removes both. PyTorch's CUDA caching allocator already
does this for GPU tensors, so this matters for CPU training only (and for the
host side of a GPU run, where it does no harm).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc's largest allowed mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2): blocks up to
# this size come from the heap and are reused; larger ones are still mapped per allocation.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30  # freed memory kept at the top of the heap before trimming
TOP_PAD_BYTES = 64 << 20  # extra heap requested per growth


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep and reuse freed memory; returns whether it applied.

    Sets ``M_MMAP_THRESHOLD`` (32 MiB), ``M_TRIM_THRESHOLD`` (1 GiB) and
    ``M_TOP_PAD`` (64 MiB) through ``mallopt``: the same as starting the process
    with ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_TOP_PAD_`` set. The cost is that up to 1 GiB of freed memory stays
    with the process. Does nothing (returns False) outside glibc, e.g. on macOS
    or musl.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
