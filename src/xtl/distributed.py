"""Explanation, evaluation and faithfulness on several processes, on the engine fine-tuning runs on
(Lightning Fabric, strategy ddp: gloo on the CPU, nccl on GPUs).

`launch(devices, num_nodes, device)` starts the processes once per command (Fabric re-runs the
command in the others, or joins those that torchrun / SLURM started) and says which one this is:
a `Ranks`. Each rank takes its share of the work (`mine`: batches k with k % world == rank;
`block`: a contiguous run of whole batches), writes what it computed to the files a single process
would write (per batch: the stored maps' shards, the faithfulness cache), and rank 0 merges after
a `barrier`; so the result is the single-process result, and a killed job resumes per batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from xtl.errors import XtlError


@dataclass(frozen=True)
class Ranks:
    """Which of `world` processes this one is; `device` its device (None: as the command asked)."""

    rank: int = 0
    world: int = 1
    fabric: object | None = None
    device: str | None = None

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def mine(self, k: int) -> bool:
        """Whether batch `k` is this process's (batches dealt out in turn: balanced to one batch)."""
        return k % self.world == self.rank

    def block(self, n_batches: int) -> range:
        """This process's contiguous run of `n_batches` batches (the first ones get one more)."""
        per, extra = divmod(n_batches, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def gather(self, value) -> list:
        """`value` of every process, in rank order (any picklable object)."""
        if self.fabric is None:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values


# what gloo and nccl say when a peer's connection closes under a collective
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote worker", "NCCL communicator was aborted",
             "Broken pipe")


def lost_peer(err: BaseException) -> XtlError | None:
    """The one line for a collective (a barrier, a gather, DDP's gradient all-reduce) that failed because
    another process of the command failed (its own error is printed once, by it) or was killed: its
    connection closed, and gloo or nccl raise a backend error with a traceback. None for any other
    error. Every process writes each finished batch (and fine-tuning each finished epoch), so the
    same command continues from them."""
    import torch.distributed as dist

    if not isinstance(err, RuntimeError) or isinstance(err, XtlError) or not any(s in str(err) for s in LOST_PEER):
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return XtlError(f"process {dist.get_rank() + 1} of {dist.get_world_size()}: another process of this command failed "
                    "(its error is above) or was killed; finished work is kept, and the same command continues from it")


SINGLE = Ranks()
_launched: Ranks | None = None


def launch(devices: int = 1, num_nodes: int = 1, device: str | None = None, accelerator: str = "auto") -> Ranks:
    """The processes of `--devices N --num-nodes M` (once per command; a later call returns the same
    `Ranks`), or `SINGLE` for one. Checked before any work, as fine-tuning checks them
    (`xtl.device.check_training_hardware`): more devices or nodes than there are would wait forever."""
    global _launched
    if _launched is not None:
        return _launched
    for option, value in (("--devices", devices), ("--num-nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise XtlError(f"option {option} must be a whole number >= 1, not {value!r}")
    if devices == 1 and num_nodes == 1:
        return SINGLE
    from xtl.device import check_training_hardware, resolve_device

    if device is not None and ":" in str(device):
        raise XtlError(f"option --device {device} with --devices {devices}: each process takes its own device; "
                       "give cpu or cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    kind = resolve_device(device, accelerator).type
    check_training_hardware(kind, devices, num_nodes)
    import logging

    from lightning.fabric import Fabric
    from lightning_utilities.core import rank_zero

    rank_zero.log.setLevel(logging.WARNING)
    try:
        fabric = Fabric(accelerator=kind, devices=devices, num_nodes=num_nodes, strategy="ddp", precision="32-true")
    except (ValueError, RuntimeError) as err:
        raise XtlError(f"options --devices {devices} --num-nodes {num_nodes} on {kind}: {str(err).splitlines()[0]}") from None
    fabric.launch()
    if kind == "cpu":  # each process its share of the cores, not all of them each
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    _launched = Ranks(fabric.global_rank, fabric.world_size, fabric, str(fabric.device))
    return _launched
