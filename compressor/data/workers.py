"""Loader workers: batches built in ``torch.utils.data.DataLoader`` worker processes, in order.

Training, evaluation and prediction read their images through :func:`ordered_loader`: item ``i``
of a map-style dataset is the ``i``-th batch of the loop (a training micro-batch decoded and
preprocessed into tensors; an evaluation batch's decoded images), and the loader returns them in
index order (``batch_size=None``, sequential sampler, ``in_order=True`` by default), so 0 and N
workers give the same batches in the same order: the workers only move the JPEG decoding and the
processor off the process that runs the model (PyTorch's ``DataLoader`` with ``num_workers``,
``pin_memory`` for CUDA; https://pytorch.org/docs/stable/data.html#multi-process-data-loading).

Workers are forked (Linux), so the batch function needs no pickling; each worker runs torch with
one thread (the DataLoader's default), and what they hand back is pickled through shared memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: The most workers the default gives (each holds a copy of what its batches decode).
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """A quarter of this process's CPUs, at most :data:`MAX_DEFAULT_WORKERS` (0 below 4 CPUs: the
    model's own threads need the cores more than a worker would)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, cpus // 4)


def resolve_workers(num_workers: int | None) -> int:
    """``data.num_workers`` as a count: None → :func:`default_workers`."""
    return default_workers() if num_workers is None else int(num_workers)


class _Indexed:
    """Map-style dataset: ``make(i)`` for ``i < n`` (the DataLoader's ``__getitem__``/``__len__``)."""

    def __init__(self, make: Callable[[int], Any], n: int):
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.make(i)


def ordered_loader(make: Callable[[int], Any], n: int, num_workers: int = 0, pin_memory: bool = False):
    """Iterate ``make(0), make(1), …, make(n - 1)``, built in ``num_workers`` worker processes.

    Args:
        make: index → batch (a dict of CPU tensors, a list of images …); called in a worker
            process when ``num_workers > 0`` (forked: closures are fine, side effects stay there).
        n: number of batches.
        num_workers: worker processes (0: built here, one at a time, when asked for).
        pin_memory: page-lock tensors for faster copies to CUDA.

    Returns:
        An iterable of the ``n`` batches in index order.
    """
    if num_workers <= 0 or n <= 1:
        return (make(i) for i in range(n))
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        _Indexed(make, n),
        batch_size=None,
        shuffle=False,
        num_workers=min(num_workers, n),
        pin_memory=pin_memory,
        collate_fn=_identity,
        prefetch_factor=2,
        # The workers' base seed comes from this generator, not from the global one, so a loop
        # with workers draws the same dropout masks as one without.
        generator=torch.Generator().manual_seed(0),
    )


def _identity(x):
    return x
