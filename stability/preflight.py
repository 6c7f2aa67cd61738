"""Checks that need more than a configuration's own values, run before any work starts.

`stab run` and `stab sweep` call `preflight` on every configuration before the first step. Each
check loads torch, the codec or the text only when it has something to look at, so a sweep that
hands its jobs to worker processes (joblib, submitit) checks the usual grid without importing
torch into its own process: the workers start sooner.
"""

from __future__ import annotations

from pathlib import Path

from stability.config import ConfigError, CustomModelConfig, DataConfig, RunConfig, did_you_mean


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
    if isinstance(cfg.data, DataConfig) and (cfg.data.name == "folder" or cfg.data.codec.weights != "random"):
        # every file of a folder, the codec weights (synthetic clips and random weights: nothing on disk)
        from stability.workloads.cascade.data import check_audio

        check_audio(cfg.data, need_codec=cfg.listen.enabled)
    if cfg.model.name == "custom":  # build it once: the factory, its data, a forward and backward
        _check_custom(cfg)
    elif cfg.fault.nan_at_step is not None:
        _check_fault_module(cfg)
    if cfg.model.name == "charlm":  # the text must exist, be UTF-8 and be long enough
        from stability.workloads.charlm.workload import configs, load_split

        split = load_split(cfg)
        check_fault_steps(cfg, (len(split.train) - 1) // configs(cfg)[0].context)
    elif isinstance(cfg.data, DataConfig) and cfg.data.name == "synthetic":  # the cascade's synthetic clips
        assert cfg.data.n_train is not None  # null (all segments) is for data=folder only: the schema checks it
        check_fault_steps(cfg, cfg.data.n_train)


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


def check_fault_steps(cfg: RunConfig, n_train: int) -> None:
    """A fault step (`fault.nan_at_step`, `crash_at_step`, `spike_at_step`) must be one the run
    takes: there are `train.epochs` x (n_train // train.batch_size) steps, numbered from 0.
    Raises ConfigError naming the key, its value and the run's steps."""
    per_epoch = max(1, n_train // cfg.train.batch_size)
    total = cfg.train.epochs * per_epoch
    for key in ("nan_at_step", "crash_at_step", "spike_at_step"):
        step = getattr(cfg.fault, key)
        if step is not None and step >= total:
            raise ConfigError(
                f"fault.{key}={step} is past the end of the run: it takes {total} steps, numbered 0 to "
                f"{total - 1} (train.epochs={cfg.train.epochs} x {per_epoch} batches of "
                f"train.batch_size={cfg.train.batch_size} from {n_train} training examples)"
            )


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


_CUSTOM_CHECKED: dict[str, tuple[list[str], int]] = {}  # run identity -> (module groups, n_train), per process


def _check_custom(cfg: RunConfig) -> None:
    """Call the factory and check what it returns (stability.workloads.custom): once per
    configuration and process, since `stab run` checks before it creates the run folder and the
    run checks again."""
    key = cfg.identity()
    if key not in _CUSTOM_CHECKED:
        import torch

        from stability.workloads.custom import CustomWorkload

        work = CustomWorkload(cfg, torch.device("cpu"))
        _CUSTOM_CHECKED[key] = (list(work.module_groups()), work.n_train)
    names, n_train = _CUSTOM_CHECKED[key]
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is more than the training data: "
            f"model._target_={getattr(cfg.model, 'target', None)} gives {n_train} training examples; expected at most {n_train}"
        )
    if cfg.fault.nan_at_step is not None and cfg.fault.nan_module not in names:
        raise ConfigError(
            f"fault.nan_module={cfg.fault.nan_module!r} is not a module group of this model: "
            f"expected one of {', '.join(names)}" + did_you_mean(cfg.fault.nan_module, names)
        )
    check_fault_steps(cfg, n_train)


def _check_fault_module(cfg: RunConfig) -> None:
    import torch

    from stability.workloads import build_model

    assert not isinstance(cfg.model, CustomModelConfig)  # custom models: `_check_custom`
    with torch.device("meta"):  # names only: no memory, no init cost
        names = list(build_model(cfg.model).module_groups())
    if cfg.fault.nan_module not in names:
        raise ConfigError(
            f"fault.nan_module={cfg.fault.nan_module!r} is not a module group of this model: "
            f"expected one of {', '.join(names)}" + did_you_mean(cfg.fault.nan_module, names)
        )
