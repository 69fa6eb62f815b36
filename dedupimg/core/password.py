"""Where an encrypted repository's password comes from, as restic reads it.

In this order: ``$DEDUPIMG_PASSWORD``; the first line of ``$DEDUPIMG_PASSWORD_FILE`` (``--password-file``);
the first line ``$DEDUPIMG_PASSWORD_COMMAND`` prints (``--password-command``, run without a shell); else the
prompt the CLI registered (a terminal). ``copy --from-repo`` reads the source's from the same variables with
``DEDUPIMG_FROM_`` in place of ``DEDUPIMG_``. Only encrypted repositories ask: opening an unencrypted one never
calls :meth:`PasswordSource.get`.
"""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from dedupimg.core.errors import UsageError, WrongPassword

# The CLI registers a function that asks on the terminal (twice when ``confirm``); the library never prompts.
Prompt = Callable[[str, bool], str]
_prompt: Prompt | None = None

MAX_PASSWORD = 4096
COMMAND_TIMEOUT = 120.0  # seconds a --password-command may take


def set_prompt(prompt: Prompt | None) -> None:
    global _prompt
    _prompt = prompt


@dataclass(frozen=True)
class PasswordSource:
    prefix: str = "DEDUPIMG_"
    what: str = "the repository"
    options: str = "--password-file / --password-command"  # the command line's ways to give it

    def given(self) -> str | None:
        """The password from the environment, a file or a command; None when none of them is set."""
        env = os.environ
        direct = env.get(self.prefix + "PASSWORD")
        if direct is not None:
            return direct
        path = env.get(self.prefix + "PASSWORD_FILE")
        if path:
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    return _first_line(f.read(MAX_PASSWORD + 2), f"password file {path}")
            except OSError as exc:
                raise WrongPassword(f"cannot read password file {path}: {exc.strerror}") from None
        command = env.get(self.prefix + "PASSWORD_COMMAND")
        if command:
            return _from_command(command)
        return None

    def get(self, purpose: str = "", confirm: bool = False) -> bytes:
        """The password as bytes; WrongPassword (exit 22) when none is given and no terminal can be asked."""
        password = self.given()
        if password is None:
            if _prompt is None:
                need = "needs a password" if self.prefix == NEW_PREFIX else "is encrypted"
                raise WrongPassword(f"{self.what} {need} and none was given: set {self.prefix}PASSWORD or "
                                    f"{self.prefix}PASSWORD_FILE, or use {self.options}")
            password = _prompt(f"password for {self.what}" + (f" ({purpose})" if purpose else ""), confirm)
            # Processes this command starts (a mount's server) open the repository too: they read it here.
            os.environ[self.prefix + "PASSWORD"] = password
        if not password:
            raise WrongPassword("an empty password is not accepted")
        return password.encode("utf-8", errors="surrogateescape")


def _first_line(text: str, what: str) -> str:
    if len(text) > MAX_PASSWORD:
        raise WrongPassword(f"{what} is longer than {MAX_PASSWORD} characters")
    return text.split("\n", 1)[0].rstrip("\r")


def _from_command(command: str) -> str:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"password command {command!r} cannot be parsed: {exc}") from None
    if not argv:
        raise UsageError("the password command is empty")
    try:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
            out = _read_bounded(proc, COMMAND_TIMEOUT)
            if len(out) > MAX_PASSWORD:
                proc.kill()
            code = proc.wait(timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WrongPassword(f"password command {argv[0]} failed: {exc}") from None
    if len(out) <= MAX_PASSWORD and code != 0:
        raise WrongPassword(f"password command {argv[0]} exited with {code}")
    return _first_line(out.decode("utf-8", errors="surrogateescape"), f"output of {argv[0]}")


def _read_bounded(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """At most MAX_PASSWORD + 1 bytes of ``proc``'s output, until it closes it, within ``timeout`` seconds
    (found by review: `cat /dev/zero` as the command grew without limit); TimeoutExpired after that."""
    assert proc.stdout is not None
    fd, out = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while len(out) <= MAX_PASSWORD:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, timeout)
        piece = os.read(fd, MAX_PASSWORD + 1 - len(out))
        if not piece:
            break
        out += piece
    return out


NEW_PREFIX = "DEDUPIMG_NEW_"
REPOSITORY = PasswordSource()
SOURCE_REPOSITORY = PasswordSource("DEDUPIMG_FROM_", "the source repository", "--from-password-file")
NEW_KEY = PasswordSource(NEW_PREFIX, "the new key", "--new-password-file")


def prefer_file(prefix: str, path: str) -> None:
    """A password file given on the command line wins over the environment's password or command (the
    variables are rewritten, so that the processes this command starts read the same)."""
    os.environ[prefix + "PASSWORD_FILE"] = path
    os.environ.pop(prefix + "PASSWORD", None)
    os.environ.pop(prefix + "PASSWORD_COMMAND", None)
