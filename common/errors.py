"""Errors a user can fix, and the one way every command line reports them.

``UserError`` is bad input, configuration or state: its message names the file or field and what was
expected. ``run_main`` runs a CLI body and turns a UserError into one ``error: ...`` line on stderr and exit
status 2 — never a traceback. Every CLI of the project (data tools and launchers) exits through it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input, configuration or state; the message says which file/field and what was expected."""


class DataError(UserError):
    """Bad input data or an inconsistent shard/output folder (the message names the file)."""


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI body: a UserError becomes ``[rank R] error: <message>`` (rank only in a multi-rank run) and
    exit status 2; Ctrl-C exits 130 with one line; a closed pipe (``... | head``) exits 0."""
    try:
        return int(fn(argv) or 0)
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        prefix = "" if os.environ.get("WORLD_SIZE", "1") == "1" else f"[rank {rank}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
