"""The one exception type the data tools raise for bad input or bad state.

Every ``main()`` in this package catches it, prints ``error: <message>`` and exits with status 2, so a
user sees a sentence naming the file and what was wrong instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class DataError(Exception):
    """Bad input, bad configuration or an inconsistent output folder (message names the file)."""


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
             errors: tuple[type[BaseException], ...] = (DataError,)) -> int:
    """Run a CLI body, turning the expected errors (bad input: DataError by default; launchers add their own)
    and Ctrl-C into a one-line message and exit status."""
    try:
        return int(fn(argv) or 0)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `... | head`
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
