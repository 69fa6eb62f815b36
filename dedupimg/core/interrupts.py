"""Interrupts that come too late to stop anything.

The CLI turns SIGINT and SIGTERM into an exception (exit 130, "nothing partial is kept"). Once the index
transaction that lists a new snapshot commits, that is no longer true: the snapshot exists, whole. A signal from
then on must not make the command report failure for a snapshot that is listed, so the writer marks the moment
here, just before that transaction (a signal between the commit and a mark after it would still raise), and the
CLI's handler lets such a late signal pass: the command finishes, prints the snapshot and exits with its normal
code. Only a one-shot command sets it; the process ends soon after (and the CLI lets no signal change its exit
code once the command has returned: cli/main.py).
"""

from __future__ import annotations

_past_commit = False


def mark_committed() -> None:
    """The work this process was started for is durable and visible: later interrupts cannot undo it."""
    global _past_commit
    _past_commit = True


def past_commit() -> bool:
    return _past_commit


def reset() -> None:
    """For tests that run several commands in one process."""
    global _past_commit
    _past_commit = False
