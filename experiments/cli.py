"""The scripts' front door: Hydra entry points whose mistakes cost one line, not a traceback.

``entry("config")`` wraps a task function in ``@hydra.main`` after a preflight that checks the
command line the way Hydra will read it: unknown config-group choices (``model=foo``), unknown
keys (``model.widht=1``), malformed overrides and an output dir that cannot be written each end
the process with ``error: ...`` on one line of stderr and exit status 2, before any run dir exists.
A script may add its own check of the composed config (``entry(..., check=...)``: run.py builds
the model on the meta device, reproduce.py and benchmark.py try their ``out`` dir); it runs in the
same preflight, except in ``-m`` sweeps, where each job's mistakes are recorded as that job's failure.
Inside the task, a :class:`ValueError` (convlab's bad-input error) ends the same way.
"""

from __future__ import annotations

import difflib
import errno
import functools
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONF_DIR",
    "Interrupted",
    "UsageError",
    "check_writable",
    "count_failed_job",
    "entry",
    "fail",
    "is_multirun",
    "preflight",
    "raise_interrupted",
    "resource_error",
    "split_argv",
]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT = 2
log = logging.getLogger("convlab")

# Hydra flags that take a value as the next token.
_FLAGS_WITH_VALUE = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-p", "--package", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_PASS_THROUGH = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}


# The configs in conf/ that belong to one script (or are a building block), for --config-name checks.
NOT_PRIMARY = {
    "config": "run.py's config",
    "benchmark": "benchmark.py's config",
    "profile": "profile.py's config",
    "report": "report.py's config",
    "reproduce": "reproduce.py's config",
    "backbone": "a model building block",
}

# What preflight and the task hand to entry()'s code across Hydra's call: "failed_jobs", in-process
# sweep jobs that failed without a results.json; "append", override keys that must be passed as
# +key= (see preflight); "dir_override", the hydra.run.dir= / hydra.sweep.dir= that resumes this run.
_state: dict[str, Any] = {"failed_jobs": 0, "append": []}


def count_failed_job() -> None:
    """One more in-process sweep job failed without a results.json saying so: the sweep exits non-zero at its end."""
    _state["failed_jobs"] += 1


def is_multirun() -> bool:
    """True inside a job of a Hydra ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class UsageError(ValueError):
    """Bad input from the command line or a config; printed as one line."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's time limit), raised like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


def raise_interrupted(signum: int, frame: Any) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so that what is running records the interruption."""
    raise Interrupted("interrupted (SIGTERM)")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``error: message`` on one line of stderr and exit with ``code``.

    Once a run dir exists, the line also ends its log file (``run.log``), which would otherwise stop
    at the last epoch with no word of why.
    """
    line = f"error: {' '.join(str(message).split())}"
    print(line, file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("convlab", logging.ERROR, __file__, 0, line, None, None))
    sys.exit(code)


# Errors of the machine, not of the code: out of disk space or quota, a read-only or failing disk,
# a permission the user lacks. Any other OSError may be a bug and keeps its traceback.
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM)


def resource_error(ex: BaseException) -> str | None:
    """One line for running out of memory or disk, which no check before the run can foresee; None
    for anything else (a bug keeps its traceback). The run's record already says ``failed``."""
    text = " ".join(str(ex).split())
    if (
        isinstance(ex, MemoryError)
        or type(ex).__name__ == "OutOfMemoryError"
        or (isinstance(ex, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))
    ):
        shown = text.split("DefaultCPUAllocator: ")[-1][:160] or type(ex).__name__  # torch's text starts with a C++ assertion
        return f"out of memory: {shown}; a smaller trainer.batch_size, data.image_size or model needs less"
    if isinstance(ex, OSError) and ex.errno in MACHINE_ERRNOS:
        return f"{ex.strerror or text}" + (f": {ex.filename}" if ex.filename else "") + "; free the space or pick a writable dir"
    return None


def _dir_override(multirun: bool) -> str:
    """``hydra.run.dir=<this run's dir>`` (``hydra.sweep.dir=`` in a sweep): the override that makes
    the same command continue this run, whose default dir is named by the time it started."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    key, path = ("hydra.sweep.dir", Path(hc.sweep.dir).resolve()) if multirun else ("hydra.run.dir", Path(hc.runtime.output_dir))
    text = f"{key}={path}"
    return text if re.fullmatch(r"[\w./:=-]+", text) else f"'{key}=\"{path}\"'"  # quoted for the shell and Hydra's grammar


def split_argv(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, is_multirun, pass_through) from a Hydra command line."""
    overrides, multirun, skip_next = [], False, False
    for token in argv:
        if skip_next:
            skip_next = False
        elif token in _FLAGS_WITH_VALUE:
            skip_next = True
        elif token in ("-m", "--multirun"):
            multirun = True
        elif token in _PASS_THROUGH or token.split("=")[0] in _PASS_THROUGH:
            return [], multirun, True
        elif not token.startswith("-"):
            overrides.append(token)
    return overrides, multirun, False


def _config_flags(argv: list[str], config_name: str) -> tuple[str, bool]:
    """(primary config name, whether the user brings their own config dir) from Hydra's flags.

    ``--config-name NAME`` must name a YAML file in ``conf/``; a ``--config-path`` or
    ``--config-dir`` of the user's own is composed by Hydra alone (the preflight knows only ``conf/``).
    """
    name, own_dir, tokens = config_name, False, iter(argv)
    for token in tokens:
        flag, eq, value = token.partition("=")
        if flag in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"):
            value = value if eq else next(tokens, "")
            if flag in ("-cn", "--config-name"):
                name = value.removesuffix(".yaml")
            else:
                own_dir = True
    if own_dir:
        return name, own_dir
    if not (CONF_DIR / f"{name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
        raise UsageError(f"unknown config name {name!r} (--config-name); conf/ has: {known}")
    if name != config_name and name in NOT_PRIMARY:
        # reproduce.yaml under run.py trained into the current directory (its run dir is ".").
        raise UsageError(
            f"--config-name={name} is {NOT_PRIMARY[name]}, not one for this script; it reads {config_name!r} or a config of your own in conf/"
        )
    return name, own_dir


def _first_values(overrides: list[str], loader: Any, multirun: bool = True, sweeps: bool = True) -> list[str]:
    """Check every group choice (each value of a sweep too); return the overrides with sweeps cut to their first value.

    A sweep (``a,b``, ``range(...)``) without ``-m`` is a :class:`UsageError` naming the fix.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as ex:
        hint = (
            " (quote a value that holds '=' or ',', e.g. out='runs/a=1,b=2')" if "mismatched input" in str(ex)
            else " (quote a value with spaces or letters outside ASCII, e.g. name='résumé run')" if "LexerNoViableAlt" in str(ex)
            else ""
        )  # fmt: skip
        raise UsageError(f"cannot parse the command line: {str(ex).splitlines()[0]}{hint}") from None
    first = []
    for override, text in zip(parsed, overrides):
        key = override.key_or_group
        if override.is_delete():
            first.append(text)
            continue
        if override.is_sweep_override() and not multirun:
            if not sweeps:  # a script that refuses -m (reproduce.py): "add -m" would lead to another error
                raise UsageError(f"{text} sweeps over several values, which this script does not take: run it once per value")
            raise UsageError(f"{text} sweeps over several values: add -m to run one job per value, or give one value")
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        options = loader.get_group_options(key)  # [] when key is not a config group
        if options:
            for value in values:
                if value == "null":  # Hydra refuses it for a group on the command line ("Got NoneType")
                    name = key.split("/")[-1]
                    why = "it is the default: leave experiment= out" if key == "experiment" else f"a run needs a {name}"
                    raise UsageError(f"{key}=null cannot be given: {why}; choose from: {', '.join(options)}")
                if value not in options:
                    label = key.split("/")[-1] if key != "hydra/launcher" else "launcher"
                    raise UsageError(f"unknown {label} {value!r}; choose from: {', '.join(options)}")
        if override.is_sweep_override():
            prefix = text.split("=", 1)[0]
            first.append(f"{prefix}={values[0]}" if values else text)
        else:
            first.append(text)
    return first


def _kind(default: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """What a value must be to replace ``default``, as (words, test); None when anything goes."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, list):
        element = _kind(default[0]) if default and len({type(d) for d in default}) == 1 else None
        if element is None:
            return "a list", lambda v: isinstance(v, list)
        return f"a list of {element[0].removeprefix('a ')}s", lambda v: isinstance(v, list) and all(element[1](x) for x in v)
    return None  # strings, null defaults, mappings: the code that reads them checks them


def _check_types(cfg: DictConfig, base: DictConfig, keys: list[str]) -> None:
    """Each overridden key's value has the kind of its default (``seed=abc``, ``trainer.compile=maybe``).

    A null value is let through: a few keys use it on purpose (``trainer.max_steps=null``).
    """
    for key in keys:
        default = OmegaConf.select(base, key, default=None, throw_on_missing=False)
        default = OmegaConf.to_container(default) if isinstance(default, (DictConfig, ListConfig)) else default
        kind = _kind(default)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if kind is not None and value is not None and not kind[1](value):
            shown = "[" + ",".join(map(str, default)) + "]" if isinstance(default, list) else str(default).lower()
            raise UsageError(f"{key}={value!r} must be {kind[0]} (the default is {shown})")


def _unknown_key(ex: Exception) -> str | None:
    """The key of a "not in struct" composition error (``model.widht=1``), else None."""
    match = re.search(r"Could not override '([^']+)'", str(ex))
    return match.group(1) if match and "not in struct" in str(ex.__cause__) else None


def _first_line(ex: Exception) -> str:
    line = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    cause = str(ex.__cause__ or "").strip()
    return f"{line} ({cause.splitlines()[0]})" if cause else line


def _valid_keys(compose: Callable[..., DictConfig], config_name: str, overrides: list[str], key: str) -> str:
    """The keys beside ``key`` in the composed config (its nearest existing parent: ``traner.epochs``
    lists the top level), with the closest one when a typo is likely, for the error message."""
    base = compose(config_name, overrides=[o for o in overrides if not o.lstrip("+~").startswith(key)])
    parts = key.split(".")
    depth = len(parts) - 1
    while depth and not isinstance(OmegaConf.select(base, ".".join(parts[:depth])), DictConfig):
        depth -= 1
    parent = ".".join(parts[:depth])
    keys = [str(k) for k in (OmegaConf.select(base, parent) if parent else base)]
    close = difflib.get_close_matches(parts[depth], keys, n=1)
    hint = f" (did you mean {'.'.join([*parts[:depth], close[0], *parts[depth + 1 :]])}?)" if close and close[0] != parts[depth] else ""
    return f"unknown key {key!r}{hint}; {parent or 'the config'} has: {', '.join(keys)}"


def check_writable(directory: str, key: str = "hydra.run.dir=... / hydra.sweep.dir=...") -> None:
    """Create ``directory`` (as Hydra will) and a file in it; one line naming ``key`` when that fails.

    The dirs made for the check are removed again: Hydra makes its own, and a ``${now:...}`` in the
    path can resolve to a later second there, which would leave an empty run dir behind.
    An empty path is refused: it would mean the current directory (the repository, often).
    """
    if not str(directory).strip():
        raise UsageError(f"output dir is empty; pass {key} with a directory path")
    path = Path(os.path.abspath(directory))  # ".." resolved: "a/../b" must not leave "a" behind
    made: list[Path] = []  # only the levels this check created: another process's new dir is not ours
    try:
        for level in reversed([path, *path.parents]):
            if not level.exists():
                try:
                    os.mkdir(level)
                    made.append(level)
                except FileExistsError:
                    pass
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as ex:
        raise UsageError(f"output dir {directory!r} is not writable ({ex.strerror or ex}); pass {key} with a writable path") from None
    finally:
        for level in reversed(made):  # deepest first
            try:
                level.rmdir()
            except OSError:
                break


def preflight(
    argv: list[str],
    config_name: str,
    check: Callable[[DictConfig], None] | None = None,
    extra: Callable[[list[str]], list[str]] | None = None,
    no_sweep: str = "",
) -> DictConfig | None:
    """Compose the config exactly as Hydra will and turn any mistake into a :class:`UsageError`.

    ``check(cfg)`` (the script's own, see :func:`entry`) runs after composing and before the run
    dir is created; not for ``-m`` sweeps. ``extra(overrides)`` gives overrides the script will
    add itself (reproduce.py composes ``experiment=<table>``), so their keys are known here too.
    ``no_sweep``, when given, refuses ``-m`` and says why.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides, multirun, pass_through = split_argv(argv)
    if multirun and no_sweep and not pass_through:
        raise UsageError(f"-m is not for this script: {no_sweep}")
    config_name, own_dir = _config_flags(argv, config_name)
    if pass_through or own_dir:
        return None
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        first = _first_values(overrides, loader, multirun, sweeps=not no_sweep)
        added = extra(first) if extra is not None else []
        first += added
        try:
            cfg = compose(config_name, overrides=first, return_hydra_config=True)
        except Exception as ex:  # Hydra raises several types for composition errors
            key = _unknown_key(ex)
            raise UsageError(_valid_keys(compose, config_name, first, key) if key else _first_line(ex)) from None
        _check_removed(first)
        groups = [o for o in first if "=" in o and loader.get_group_options(o.split("=", 1)[0].lstrip("+~"))]
        values = [o.split("=", 1)[0].lstrip("+") for o in first if "=" in o and o not in groups and not o.startswith("~")]
        base = compose(config_name, overrides=groups, return_hydra_config=True)
        _check_types(cfg, base, values)
        _check_appended(first, added, base, lambda key: _valid_keys(compose, config_name, first, key))
        if added:
            # Keys that exist only with the task's own overrides (a table's model.depthwise): Hydra's
            # composition of the script's config lacks them, so they go to it as appends (+key=value).
            plain = compose(config_name, overrides=[g for g in groups if g not in added])
            _state["append"] = [key for key in values if OmegaConf.select(plain, key, default=_ABSENT) is _ABSENT]
        if multirun:
            _check_sweeper(cfg)
            _check_swept_keys(overrides, cfg)
            if check is not None and not added:
                _check_jobs(lambda job: compose(config_name, overrides=job, return_hydra_config=True), overrides, cfg, check)
        if check is not None and not multirun:
            check(cfg)
        check_writable(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    GlobalHydra.instance().clear()
    return cfg


_ABSENT = object()


def _check_removed(overrides: list[str]) -> None:
    """``~key`` removes a key or group; the run reads every one (a traceback deep in it), except a
    model option, which its block then takes at the default, and Hydra's own keys."""
    for text in overrides:
        key = text[1:].split("=", 1)[0] if text.startswith("~") else ""
        if (key and key.split(".")[0].split("/")[0] not in ("hydra", "model")) or key == "model":
            raise UsageError(f"{text} removes {key}, which the run reads; give it a value instead ({key}=...)")


def _check_appended(overrides: list[str], added: list[str], base: DictConfig, valid: Callable[[str], str]) -> None:
    """A ``+key=value`` that adds a key no code reads (``+trainer.epoch=3``) is a typo, not a setting.

    ``model.*`` keys are let through (the model builder names the options a block takes), and so
    are ``hydra.*`` keys (Hydra's own) and keys the script adds itself (``added``).
    """
    for text in overrides:
        if not text.startswith("+") or "=" not in text or text in added:
            continue
        key = text.split("=", 1)[0].lstrip("+")
        if key.split(".")[0] in ("hydra", "model") or OmegaConf.select(base, key, default=_ABSENT) is not _ABSENT:
            continue
        raise UsageError(f"{text} adds a key nothing reads: {valid(key)}")


def _check_swept_keys(overrides: list[str], cfg: DictConfig) -> None:
    """A sweep over a key that job dir names leave out (``device=cpu,cuda``, ``name=a,b``) would
    run every job in one dir, each resuming or refusing the one before it: refused, naming the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    if "override_dirname" not in str(sweep.get("subdir")):
        return
    excluded = set(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys", default=[]) or [])
    for override, text in zip(OverridesParser.create().parse_overrides(overrides), overrides):
        if override.is_sweep_override() and override.key_or_group in excluded:
            raise UsageError(
                f"{text}: {override.key_or_group} is left out of job dir names, so every job of this sweep "
                f"would share one run dir; run one sweep per value (or set hydra.sweep.subdir)"
            )


MAX_CHECKED_JOBS = 256  # a basic sweep's jobs checked before it starts (about 0.1 s each)


def _check_jobs(
    compose: Callable[[list[str]], DictConfig], overrides: list[str], cfg: DictConfig, check: Callable[[DictConfig], None]
) -> None:
    """Each job of a basic ``-m`` sweep (its first :data:`MAX_CHECKED_JOBS`), composed and checked as a
    single run is, before the sweep starts: a mistake only one combination has (``model=separable,depthwise
    model.widths=[48,96,128]``: a depthwise block cannot map 32 to 48 channels) costs one line, not the
    jobs trained before it."""
    if not str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")).endswith("BasicSweeper"):
        return  # the table sweeper's rows are checked by reproduce.py
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in jobs[:MAX_CHECKED_JOBS]:
        try:
            check(compose(list(job)))
        except ValueError as ex:
            values = [o for o in job if o.split("=", 1)[0] in swept] or job  # the job's own values
            raise UsageError(f"sweep job {','.join(values)}: {_first_line(ex)}") from None


def _check_sweeper(cfg: DictConfig) -> None:
    """joblib's ``n_jobs`` is not 0; the SLURM launcher has SLURM to submit to; convlab's table sweeper
    (``experiment=...`` sweeps) needs a table and a seed count >= 1."""
    launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default=""))
    if launcher.endswith("SlurmLauncher") and shutil.which("srun") is None:  # submitit's own check, before any job
        raise UsageError(
            "hydra/launcher=slurm (submitit's SLURM launcher) needs a SLURM cluster, and this machine has no srun on its PATH; run it on the "
            "cluster's login node, or use hydra/launcher=basic (one job after another) or parallel"
        )
    if "joblib" in launcher.lower():
        n_jobs = OmegaConf.select(cfg, "hydra.launcher.n_jobs")
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0):
            raise UsageError(f"hydra.launcher.n_jobs={n_jobs!r} must be a whole number >= 1 (parallel jobs), or -1 for one per core")
    if not str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")).endswith("TableSweeper"):
        return
    seeds = OmegaConf.select(cfg, "hydra.sweeper.seeds")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"hydra.sweeper.seeds={seeds!r} must be a whole number >= 1 (seeds per table row)")
    if OmegaConf.select(cfg, "table.rows") is None:
        raise UsageError("hydra/sweeper=table needs a table: pass experiment=NAME (see conf/experiment)")


def _flags_first(argv: list[str]) -> list[str]:
    """Hydra's argument parser wants its flags (``-m``, ``--cfg job``) before the overrides; users do not."""
    flags, overrides, take_value = [], [], False
    for token in argv:
        if take_value:
            flags.append(token)
            take_value = False
        elif token.startswith("-"):
            flags.append(token)
            take_value = token in _FLAGS_WITH_VALUE or token in ("-c", "--cfg")
        elif flags and flags[-1] in ("-i", "--info") and token in _INFO_CHOICES:
            flags.append(token)  # --info's optional value
        else:
            overrides.append(token)
    return flags + overrides


def entry(
    config_name: str,
    check: Callable[[DictConfig], None] | None = None,
    extra: Callable[[list[str]], list[str]] | None = None,
    interrupted: str = "",
    no_sweep: str = "",
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorator for a script's task: preflight, then ``@hydra.main``; ``ValueError`` -> one line, exit 2.

    Args:
        config_name: the primary config in ``conf/``.
        check: raises ``ValueError`` on a composed config the task would refuse; run in the
            preflight (not in ``-m`` sweeps), so the mistake costs one line before any run dir exists.
        extra: the overrides the task adds itself, from the command line's (see :func:`preflight`).
        interrupted: what is kept when the task is interrupted (Ctrl-C, SIGTERM), said after the
            ``error: interrupted ...`` line; ``{dir_override}`` in it becomes the override that names
            the run's (or sweep's) dir, see :func:`_dir_override`.
        no_sweep: why ``-m`` makes no sense for this script (it is refused in one line); empty: sweeps allowed.
    """
    import hydra

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            _state["dir_override"] = _dir_override(is_multirun())
            try:
                return task(cfg)
            except (ValueError, MemoryError, RuntimeError, OSError) as ex:
                message = str(ex) if isinstance(ex, ValueError) else resource_error(ex)
                if message is None:
                    raise  # a bug: its traceback
                if not is_multirun():
                    fail(message, code=EXIT_BAD_INPUT if isinstance(ex, ValueError) else 1)
                # In a sweep the other jobs go on; the process exits non-zero at the end.
                log.error("error: %s", " ".join(message.split()))
                count_failed_job()
                return None

        hydra_task = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(guarded)

        def main() -> Any:
            sys.argv[1:] = _flags_first(sys.argv[1:])
            try:
                preflight(sys.argv[1:], config_name, check, extra, no_sweep)
            except ValueError as ex:  # UsageError and the script's own checks
                fail(str(ex))
            appended = set(_state["append"])
            sys.argv[1:] = [
                f"+{t}" if "=" in t and not t.startswith(("+", "~")) and t.split("=", 1)[0] in appended else t for t in sys.argv[1:]
            ]
            signal.signal(signal.SIGTERM, raise_interrupted)
            try:
                result = hydra_task()
            except KeyboardInterrupt as ex:  # Ctrl-C, or SIGTERM (Interrupted)
                what = ex.args[0] if ex.args else "interrupted (Ctrl-C)"
                kept = interrupted.format(dir_override=_state.get("dir_override") or "the same run dir")
                fail(f"{what}; {kept}" if kept else what, code=getattr(ex, "exit_code", 130))
            if _state["failed_jobs"]:
                fail(f"{_state['failed_jobs']} sweep job(s) failed; see the messages above", code=1)
            return result

        return main

    return decorate
