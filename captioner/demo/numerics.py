"""Pinned CPU numerics for the demos, so the numbers the README quotes are the numbers a user gets.

Training a float32 model is bitwise reproducible on a CPU only when every reduction is split the same
way. Two things change the split from one machine to the next:
  - the number of intra-op threads (torch uses one per core: a 2-core and an 8-core machine sum a
    matrix product's partial results in a different order), and
  - the instruction set the kernels are compiled for (torch's own vectorised kernels, MKL's BLAS and
    oneDNN each pick AVX2 or AVX-512 at start-up; wider vectors, other rounding).
Rounding differences of 1e-7 grow over a few hundred optimiser steps into a different model, and the
demo's CIDEr moved by several tenths between machines. The demos therefore run on a fixed number of
threads with AVX2 kernels, which every x86-64 CPU of the last decade has. On other CPUs (ARM, or
x86 without AVX2) the numbers differ slightly; the README quotes the spread over seeds.

`pin_kernels` must run before torch is imported (the libraries read these variables when they load);
a variable the user has set is left alone. `pinned_threads` can run at any time.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

DEMO_THREADS = 2
KERNEL_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised kernels
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: the AVX2 code path everywhere
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions)
}


def pin_kernels() -> dict[str, str]:
    """Sets the kernel variables the user has not set; returns what was set."""
    chosen = {k: v for k, v in KERNEL_ENV.items() if k not in os.environ}
    os.environ.update(chosen)
    return chosen


@contextlib.contextmanager
def pinned_threads(n: int = DEMO_THREADS) -> Iterator[None]:
    """Runs the body on `n` intra-op threads (more than the machine's cores is fine, just slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_pinned_threads(fn: Callable) -> Callable:
    """Decorator: the whole call runs under `pinned_threads()`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with pinned_threads():
            return fn(*args, **kwargs)
    return wrapper
