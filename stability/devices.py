"""The one device resolver: a config's `train.device` name to the `torch.device` a process uses.

Every caller goes through `resolve_device`: stab's loop, preflight, `stab bench`, `stab replay`,
the monitor's bench and each rank of a data-parallel run (`stability.distributed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stability.distributed import World


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device for `train.device=name` in this process.

    Args:
        name: "auto" (a GPU where there is one, else the CPU), "cpu", "cuda", "cuda:N", or any
            other name torch accepts ("mps", ...).
        world: this process's place in a data-parallel run; in one (`world.distributed`) "auto"
            and "cuda" mean GPU LOCAL_RANK of the node, modulo the GPUs this process sees (a
            SLURM job with --gpus-per-task shows each task one), which becomes the current device.

    Returns:
        The `torch.device`.

    Raises:
        ValueError: a CUDA device is asked for on a machine without CUDA (the message names the
            value and what is allowed).
    """
    cuda = torch.cuda.is_available()
    if name.startswith("cuda") and not cuda:
        raise ValueError(f"train.device={name!r}: CUDA is not available on this machine; use auto or cpu")
    if world is not None and world.distributed and name in ("auto", "cuda") and cuda:
        dev = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(name)
