"""The ``dedupimg`` command: ``python -m dedupimg`` and the console script (``dedupimg.__main__:main``).

A Ctrl-C is handled from the first moment: importing the command line takes a fifth of a second, and a SIGINT
then raised KeyboardInterrupt in the middle of some import, a traceback. Nothing has been done before the
command line's own handlers are installed (cli/main.py), so a signal until then ends the process at once, with
one line and exit 130. Only the standard library's modules that the interpreter has loaded already are used
here, before the handler is in place (not even typing).
"""

from __future__ import annotations

import os
import signal


def _interrupted_early(signum: int, frame: object) -> None:
    os.write(2, f"dedupimg: error: interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_early)
    signal.signal(signal.SIGTERM, _interrupted_early)
    from dedupimg.cli.main import main as run

    run()


if __name__ == "__main__":
    main()
