"""Running a recipe under ``accelerate launch`` (or ``torchrun``): one process per device.

Every process runs the runner; only the main process (rank 0) writes the run directory. Stages
that train (those whose declaration says ``trains``) run in every process together: the training
loop (:mod:`compressor.training`) wraps the model in DistributedDataParallel through accelerate and
each process trains on its share of every batch; the main process writes the stage folder, the
others write into a scratch folder that is deleted. Stages declared ``sharded`` (``evaluate``,
``predict``) also run in every process: each captions its share of the batches
(:func:`compressor.evaluation.harness.shard_batches`), :meth:`Dist.gather` brings every caption to
every process in the original order, and the main process scores them once, measures latency
alone and writes the output, which equals a single process's. Importance calibration
(``remove_layers`` by block influence) stays on the main process: a few calibration batches of
forward passes, seconds against an evaluation's thousands of beam-searched captions, and its
per-layer statistics would have to be all-reduced for a speed-up that does not matter. Every
other stage runs on the main process while the others wait at a barrier; stage folder names are deterministic (hashes of the stage
key), so every process then continues from the same folders. The artifacts are the same as a
single-process run's.

On CPUs, accelerate selects the gloo backend when the Accelerator is created with ``cpu=True``
and the launcher sets ``WORLD_SIZE`` (``accelerate launch --multi_gpu --num_processes 2`` on a
machine without GPUs, or ``torchrun --nproc_per_node 2``; ``accelerate launch --cpu`` starts a
single process). The process group is initialised here, before any other accelerate object, so
that the choice is made once for the whole run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

@dataclass
class Dist:
    """Where this process stands in a multi-process run.

    Attributes:
        world: number of processes (1 without a launcher).
        rank: this process's index (0 = main).
    """

    world: int = 1
    rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.enabled:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's ``items`` concatenated in rank order, on every process (picklable items).

        Every process must call it; one process: ``items`` itself.
        """
        if not self.enabled:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def scratch_dir(self, run_dir: Path, name: str) -> Path:
        """A private folder for a non-main process's copy of a training stage's output."""
        return Path(tempfile.mkdtemp(prefix=f".rank{self.rank}-{name}-", dir=run_dir))

    @staticmethod
    def drop(path: Path) -> None:
        """Delete a scratch folder (and everything in it)."""
        shutil.rmtree(path, ignore_errors=True)


def world_size() -> int:
    """Processes in this run, from the launcher's environment (torchrun / accelerate, MPI); 1 without one."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def init(device: str) -> Dist:
    """Initialise the process group when started by a launcher; returns this process's place.

    Args:
        device: the recipe's resolved device (``cpu`` → gloo; ``cuda`` → one GPU per process, NCCL).
    """
    world = world_size()
    if world <= 1:
        return Dist()
    from accelerate import PartialState

    if device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    state = PartialState(cpu=device == "cpu")
    if state.num_processes != world:
        log.warning("launched with WORLD_SIZE=%d but accelerate sees %d process(es)", world, state.num_processes)
    log.info("distributed run: process %d of %d (%s, backend %s)", state.process_index, state.num_processes,
             state.distributed_type, state.backend)
    return Dist(world=state.num_processes, rank=state.process_index)
