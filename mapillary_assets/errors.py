"""Errors a person acts on, free of Dagster so the CLI can catch them without loading it."""


class PipelineFailed(RuntimeError):
    """A job of the pipeline failed; what it stored is kept, and a re-run does only what is missing."""


class UserError(Exception):
    """Something the user can fix; the CLI prints `error: <message>` without a traceback (unless
    --debug)."""
