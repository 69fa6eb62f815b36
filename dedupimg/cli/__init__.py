"""The command line: one module per command, each of which parses its options, calls one library function and
renders the result. The only package that imports typer and rich.

- ``main``: the entry point (``dedupimg.cli.main:main``, which ``dedupimg/__main__.py`` imports once its early
  SIGINT handler is in place). Registers the commands on the app in the order the
  help lists them, installs the signal handlers, and is the one place that turns exceptions into exit codes.
- ``app``: the typer app, its root callback (``-r/--repo`` before the command) and the shared option types
  (``RepoOption`` for ``-r`` after the command, ``LockWait``, ``JsonOption``, ...) and ``open_repo``.
- ``render``: what several commands print alike (exit codes in help, sizes, JSON of a snapshot record or a
  prune report, progress bars on stderr).
- One module per command, named exactly as the command, so that ``dedupimg prune`` is ``cli/prune.py``:
  ``init``, ``snapshot``, ``snapshots``, ``restore``, ``verify``, ``info``, ``check``, ``repair`` (the
  ``repair`` group and its ``index`` command), ``forget``, ``prune``, ``mount``, ``serve``. Each defines the
  command function and ``register(app)``.

Imports run one way: main -> command modules -> app, render -> the library; no command module imports
``main`` or another command module. Names are not prefixed (``cmd_prune``): imports are absolute, so
``dedupimg.cli.prune`` never shadows ``dedupimg.ops.prune``; where a command and the library function it calls
share a name, the library function is imported under a longer one (``prune as prune_repository``).
Registration is explicit (``register``, called by ``main``) rather than a side effect of importing, so the
order of ``dedupimg --help`` does not depend on import order.
"""
