"""One thread for many small kernels: torch's thread pool only adds fan-out there, and on a busy
machine its threads wait on each other."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block (or, as ``@one_thread()``, the function) on one torch thread; the caller's
    setting returns after.

    Measured on 2 cores with other processes running: check weights on an SD1 LoRA 14 s -> 0.2 s
    (load 12); LoHa directions of the SDXL LoHa fixture's 1052 modules 45 s -> 4.4 s (load 5).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread while the block runs its own worker threads (OpenBLAS' threads
    spin while they wait: two workers with two BLAS threads each on two cores ran 1.6x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
