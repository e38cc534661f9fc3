"""How the CLI tells a user what went wrong: which errors are the user's to fix (shown as
`error: <message>`, no traceback), the user's error inside a failed run, and run log lines on the
console without their stack traces."""

from __future__ import annotations

import contextlib
import logging
import re
import sys

from mapillary_assets.errors import PipelineFailed, UserError


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors raised for bad input (the AOI, a setting, the token, a damaged stage file) or by the
    API once the client's retries are spent (an unreachable host, a refused request); their messages
    name the problem and the fix."""
    from dagster import DagsterInvalidConfigError

    from mapillary_assets.api.errors import MapillaryError
    from mapillary_assets.defs.resources import ConfigError
    from mapillary_assets.pipeline.aoi import AoiError
    from mapillary_assets.pipeline.chunks import ChunkError
    from mapillary_assets.pipeline.filters import FilterPolygonError
    from mapillary_assets.storage import StorageError

    return (
        UserError,
        AoiError,
        ConfigError,
        MapillaryError,
        ChunkError,
        FilterPolygonError,
        StorageError,
        DagsterInvalidConfigError,
    )


_STACK_TRACE = re.compile(r"\n?Stack Trace:\n(?:[ \t].*(?:\n|$))*")


def without_stack_traces(message: str) -> str:
    """A Dagster event line with its serialised error chain, every stack trace removed (the messages stay)."""
    return _STACK_TRACE.sub("\n", message)


class _StackTraceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Stack Trace:" in message:
            record.msg, record.args = without_stack_traces(message), ()
        return True


@contextlib.contextmanager
def console_without_stack_traces():
    """The runs' console lines without stack traces (the event log, which the UI shows, keeps them).
    Dagster builds each run's console logger with `logging.getLoggerClass()` and offers no other hook
    for runs without run config, so for as long as this lasts new loggers are created with the filter."""
    base = logging.getLoggerClass()

    class ConciseLogger(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.addFilter(_StackTraceFilter())

    logging.setLoggerClass(ConciseLogger)
    try:
        yield
    finally:
        logging.setLoggerClass(base)


def reason_of_failed_run(instance, failure: PipelineFailed, debug: bool = False) -> str:
    """The user's error inside the run that just failed: the first user error in its events' chains
    of causes, else the innermost cause; `failure`'s own message says which job and run."""
    import dagster as dg

    from mapillary_assets.runners.failures import error_chains

    user_errors = {name for error_type in user_error_types() for name in _class_names(error_type)}
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]), limit=1)
    innermost = []
    for chain in error_chains(instance, runs[0].run_id) if runs else []:
        if debug:
            print(chain[0].to_string(), file=sys.stderr)
        for error in chain:
            if error.cls_name in user_errors:  # its message reads "module.Class: text"
                text = error.message.strip().split(f"{error.cls_name}: ", 1)[-1]
                return f"{text}\n  ({failure})"
            innermost.append(error.message.strip())
    return f"{failure}" + (f": {innermost[-1]}" if innermost else "")


def _class_names(error_type: type) -> set[str]:
    """The names of a class and its subclasses: a run's event log keeps only an error's class name."""
    names = {error_type.__name__}
    for subclass in error_type.__subclasses__():
        names |= _class_names(subclass)
    return names
