"""Checks that need more than a configuration's own values, run before any work starts.

`stab run` and `stab sweep` call `preflight` on every configuration before the first step: the
checks every run shares (device, the files it names, its trackers), then the workload's own
(`stability.workloads.registry`: its data, module groups and fault steps). Each check loads
torch, the codec or the text only when it has something to look at, so a sweep that hands its
jobs to worker processes (joblib, submitit) checks the usual grid without importing torch into
its own process: the workers start sooner.
"""

from __future__ import annotations

from pathlib import Path

from stability.config import ConfigError, DataConfig, RunConfig
from stability.workloads.registry import workload


def preflight(cfg: RunConfig) -> None:
    """Raises ConfigError (or the data's DataError / CodecError) naming the bad value."""
    _check_device(cfg)
    if cfg.train.rewind_from is not None:
        _check_snapshot_file(cfg.train.rewind_from)
    if isinstance(cfg.data, DataConfig) and cfg.data.cache_dir is not None:
        _check_cache_dir(cfg.data.cache_dir)
    if cfg.log:  # a tracker's package must be installed (looked up, not imported)
        from stability.trackers import check_installed

        check_installed(cfg.log)
    workload(cfg.model.name).check(cfg)


def _check_snapshot_file(path: str) -> None:
    """`train.rewind_from` names a file, as training opens it (the path as written; `~` is not
    expanded there): a missing one is refused before the run folder is made, not after."""
    if Path(path).is_file():
        return
    expanded = Path(path).expanduser()
    if expanded != Path(path) and expanded.is_file():
        raise ConfigError(f"train.rewind_from={path!r}: ~ is not expanded here; write the full path: {expanded}")
    what = "a folder" if Path(path).is_dir() else "no such file"
    raise ConfigError(
        f"train.rewind_from={path!r}: {what}; expected a snapshot file (RUN/snapshots/stepN.pt, written with "
        "train.snapshot_every=N)"
    )


def _check_cache_dir(path: str) -> None:
    """`data.cache_dir` is a folder or can be made one: a file there (or above it) is refused
    before the run folder is made, not when the first latent is written."""
    p = Path(path).expanduser()
    for above in (p, *p.parents):
        if above.exists():
            if not above.is_dir():
                where = "" if above == p else f" ({above} is a file)"
                raise ConfigError(
                    f"data.cache_dir={path!r}: not a folder{where}; expected a folder for the latent cache "
                    "(null: $STAB_CACHE or ~/.cache/stab)"
                )
            return


def _check_device(cfg: RunConfig) -> None:
    device, precision = cfg.train.device, cfg.train.precision
    if device in ("auto", "cpu") and precision != "bf16":
        return  # always available: auto takes a GPU where the job runs, if there is one
    import torch

    from stability.devices import resolve_device

    try:
        resolved = resolve_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if precision == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision=bf16 is not allowed on {torch.cuda.get_device_name(resolved)}: "
            f"it has no bf16 support; use fp32"
        )
