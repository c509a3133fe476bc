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

import functools
import logging
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT = 2
log = logging.getLogger("convlab")

# Hydra flags that take a value as the next token.
_FLAGS_WITH_VALUE = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-p", "--package", "--experimental-rerun"}
_PASS_THROUGH = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}


_state = {"failed_jobs": 0}  # failures of in-process sweep jobs


def is_multirun() -> bool:
    """True inside a job of a Hydra ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class UsageError(ValueError):
    """Bad input from the command line or a config; printed as one line."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``error: message`` on one line of stderr and exit with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


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


def _first_values(overrides: list[str], loader: Any) -> list[str]:
    """Check every group choice (each value of a sweep too); return the overrides with sweeps cut to their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as ex:
        raise UsageError(f"cannot parse the command line: {str(ex).splitlines()[0]}") from None
    first = []
    for override, text in zip(parsed, overrides):
        key = override.key_or_group
        if override.is_delete():
            first.append(text)
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        options = loader.get_group_options(key)  # [] when key is not a config group
        if options:
            for value in values:
                if value not in options and value != "null":
                    label = key.split("/")[-1] if key != "hydra/launcher" else "launcher"
                    raise UsageError(f"unknown {label} {value!r}; choose from: {', '.join(options)}")
        if override.is_sweep_override():
            prefix = text.split("=", 1)[0]
            first.append(f"{prefix}={values[0]}" if values else text)
        else:
            first.append(text)
    return first


def _unknown_key(ex: Exception) -> str | None:
    """The key of a "not in struct" composition error (``model.widht=1``), else None."""
    match = re.search(r"Could not override '([^']+)'", str(ex))
    return match.group(1) if match and "not in struct" in str(ex.__cause__) else None


def _first_line(ex: Exception) -> str:
    line = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    cause = str(ex.__cause__ or "").strip()
    return f"{line} ({cause.splitlines()[0]})" if cause else line


def _valid_keys(compose: Callable[..., DictConfig], config_name: str, overrides: list[str], key: str) -> str:
    """The keys beside ``key`` in the composed config, for the error message."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    base = compose(config_name, overrides=[o for o in overrides if not o.lstrip("+~").startswith(key)])
    node = OmegaConf.select(base, parent) if parent else base
    keys = ", ".join(str(k) for k in node) if isinstance(node, DictConfig) else ""
    return f"unknown key {key!r}; {parent or 'the config'} has: {keys}"


def check_writable(directory: str, key: str = "hydra.run.dir=... / hydra.sweep.dir=...") -> None:
    """Create ``directory`` (as Hydra will) and a file in it; one line naming ``key`` when that fails."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as ex:
        raise UsageError(f"output dir {directory!r} is not writable ({ex.strerror or ex}); pass {key} with a writable path") from None


def preflight(argv: list[str], config_name: str, check: Callable[[DictConfig], None] | None = None) -> DictConfig | None:
    """Compose the config exactly as Hydra will and turn any mistake into a :class:`UsageError`.

    ``check(cfg)`` (the script's own, see :func:`entry`) runs after composing and before the run
    dir is created; not for ``-m`` sweeps.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides, multirun, pass_through = split_argv(argv)
    if pass_through:
        return None
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        first = _first_values(overrides, loader)
        try:
            cfg = compose(config_name, overrides=first, return_hydra_config=True)
        except Exception as ex:  # Hydra raises several types for composition errors
            key = _unknown_key(ex)
            raise UsageError(_valid_keys(compose, config_name, first, key) if key else _first_line(ex)) from None
        if check is not None and not multirun:
            check(cfg)
        check_writable(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    GlobalHydra.instance().clear()
    return cfg


def entry(
    config_name: str, check: Callable[[DictConfig], None] | None = None
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorator for a script's task: preflight, then ``@hydra.main``; ``ValueError`` -> one line, exit 2.

    Args:
        config_name: the primary config in ``conf/``.
        check: raises ``ValueError`` on a composed config the task would refuse; run in the
            preflight (not in ``-m`` sweeps), so the mistake costs one line before any run dir exists.
    """
    import hydra

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except ValueError as ex:
                if not is_multirun():
                    fail(str(ex))
                # In a sweep the other jobs go on; the process exits non-zero at the end.
                log.error("error: %s", " ".join(str(ex).split()))
                _state["failed_jobs"] += 1
                return None

        hydra_task = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(guarded)

        def main() -> Any:
            try:
                preflight(sys.argv[1:], config_name, check)
            except ValueError as ex:  # UsageError and the script's own checks
                fail(str(ex))
            result = hydra_task()
            if _state["failed_jobs"]:
                fail(f"{_state['failed_jobs']} sweep job(s) failed; see the messages above", code=1)
            return result

        return main

    return decorate
