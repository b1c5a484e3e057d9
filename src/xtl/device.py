"""One device policy: where a model runs, for every command.

- An explicit device (`--device`, the pipeline's `device`) is taken as asked, or refused in one
  line when it is unknown or not on this machine: `cpu`, `cuda`, `cuda:N`, `mps`, or `auto`.
- Without one, a run's model runs where its `accelerator` says: `auto` (and `cuda`/`gpu`) is the
  GPU when there is one, else the CPU; `cpu` is the CPU. A run trained on a GPU still opens on a
  machine without one (its accelerator is a preference, not a demand).

Precision follows the device: `xtl.models.registry.native_bf16` and `inference_autocast`.
"""

from __future__ import annotations

import torch

from xtl.errors import XtlError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = None, accelerator: str = "auto",
                   option: str = "option --device") -> torch.device:
    """The torch device to run a model on: `device` if given (checked), else the one `accelerator`
    stands for on this machine. `option` names the setting in the one-line error."""
    if device is None or device == "auto":
        if accelerator == "cpu":
            return torch.device("cpu")
        if accelerator == "mps" and _mps():
            return torch.device("mps")
        return torch.device("cuda" if torch.cuda.is_available() and accelerator != "mps" else "cpu")
    text = str(device).strip().lower()
    if text == "gpu":
        text = "cuda"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise XtlError(f"{option} must be {DEVICES}, not '{device}'")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise XtlError(f"{option} {device}: this machine has no CUDA GPU that PyTorch can use; "
                           f"use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise XtlError(f"{option} {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if parsed.type == "mps" and not _mps():
        raise XtlError(f"{option} {device}: this machine has no Apple GPU (MPS) that PyTorch can use; use --device cpu")
    return parsed


def check_accelerator(accelerator: str, option: str = "option --accelerator") -> str:
    """A fine-tuning accelerator (`auto`, `cpu`, `cuda`, `gpu`, `mps`), checked to be on this machine."""
    if accelerator not in ACCELERATORS:
        raise XtlError(f"{option} must be one of {', '.join(ACCELERATORS)}, not '{accelerator}'")
    if accelerator != "auto":
        resolve_device(accelerator, option=option)
    return accelerator


def launched_for_nodes() -> bool:
    """True when a launcher (torchrun, SLURM, or by hand: WORLD_SIZE and MASTER_ADDR) set up the
    processes of several nodes; without one, Lightning waits forever for the other nodes."""
    import os

    return ("WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ) or "SLURM_NTASKS" in os.environ


def check_training_hardware(accelerator: str, devices: int, num_nodes: int) -> None:
    """Fine-tuning's `--devices` and `--num-nodes`, checked against this machine before any work:
    beyond it, Lightning's processes wait forever for peers that never come. `accelerator` is the
    one fine-tuning resolves to (cpu, cuda or mps)."""
    import os

    if num_nodes > 1 and not launched_for_nodes():
        raise XtlError(f"option --num-nodes {num_nodes}: several nodes need a launcher on each node (torchrun "
                       "--nnodes, or SLURM), which sets WORLD_SIZE and MASTER_ADDR; without one the run would wait "
                       "forever for the other nodes. On one machine use --num-nodes 1")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and world.isdigit() and int(world) != devices * num_nodes:
        raise XtlError(f"options --devices {devices} x --num-nodes {num_nodes} make {devices * num_nodes} processes, "
                       f"but the launcher started WORLD_SIZE={world}; give the launcher's --nproc-per-node and --nnodes")
    if accelerator in ("cuda", "gpu"):
        count = torch.cuda.device_count()
        if devices > count:
            raise XtlError(f"option --devices {devices}: this machine has {count} CUDA GPU(s) that PyTorch can use; "
                           f"give --devices {max(count, 1)} or fewer")
    elif accelerator == "mps":
        if devices > 1:
            raise XtlError(f"option --devices {devices}: an Apple GPU (MPS) is one device; give --devices 1")
    else:
        count = os.cpu_count() or 1
        if devices > count:
            raise XtlError(f"option --devices {devices}: on the CPU each device is a process and this machine has "
                           f"{count} CPU core(s); give --devices {count} or fewer")
