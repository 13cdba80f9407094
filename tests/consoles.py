"""Helpers for tests that run geovq's console script in a child process."""

from __future__ import annotations

import signal


def sigint_at_default() -> None:
    """A child's `preexec_fn`: SIGINT back at its default, as a terminal's foreground job has it. A test run
    started in the background by a shell (`pytest &`) ignores SIGINT, children inherit that, and Python then
    installs no KeyboardInterrupt handler: a Ctrl-C sent to the child would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
