"""What a failed run's event log says went wrong, without stack traces: Dagster wraps what a step
raised (step execution errors, resource init errors), so each error's chain of causes is walked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg


def error_chains(instance: dg.DagsterInstance, run_id: str) -> Iterator[list[Any]]:
    """Each event of the run that carries an error, as its chain of serialised errors, outermost
    first (each has `cls_name`, `message` and `to_string()`)."""
    for entry in instance.all_logs(run_id):
        chain = _causes(entry)
        if chain:
            yield chain


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The messages of a run's failure events, each with the messages of the errors that caused it
    (what a person reads in the UI, without the stack traces)."""
    messages = []
    for entry in instance.all_logs(run_id):
        if entry.dagster_event is not None and entry.dagster_event.is_failure:
            chain = _causes(entry)
            messages.append("\n".join(e.message.strip() for e in chain) if chain else entry.message)
    return messages


def _causes(entry) -> list[Any]:
    event = entry.dagster_event
    error = getattr(event.event_specific_data, "error", None) if event else None
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause or error.context
    return chain
