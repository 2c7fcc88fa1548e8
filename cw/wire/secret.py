"""
The shared secret that every cw connection authenticates with.

Where it lives, first match wins:
  1. an explicit path (C{--secret-file}, C{secret_file=});
  2. C{CW_SECRET_FILE} in the environment;
  3. C{$XDG_CONFIG_HOME/cw/secret}, else C{~/.config/cw/secret}.

The default file is created on first use with mode 0600 (its directory
0700), so a user on one machine, or on cluster nodes that share a home
directory, needs no set-up.  An explicitly named file is never created: a
worker on another machine should fail clearly rather than invent a secret
of its own.

The checks are OpenSSH's C{StrictModes}: the file must belong to the user
who runs cw (or root) and be accessible to nobody else, and every directory
above it must belong to that user or root and be writable by nobody else
(a sticky directory such as C{/tmp} excepted: others cannot replace what is
in it).  Every failure, including a filesystem error while creating or
reading the file, is a L{SecretError} naming the path and the fix.

L{write_private} is the same care for other private files (the dashboard's
token file, L{cw.master.web}).

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
from pathlib import Path

from twisted.python import usage

from cw.errors import SecretError

#: Bytes of randomness in a generated secret (written as hex).
SECRET_BYTES = 32
#: Shortest secret accepted from a file.
MIN_SECRET = 16
#: How to name another secret file, for error messages.
ELSEWHERE = "or name another secret file with --secret-file / CW_SECRET_FILE"


class Secret(bytes):
    """A secret, and C{path}, the file it was read from (named in messages)."""

    path: Path | None = None


def default_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "cw" / "secret"


def secret_path(explicit: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The secret file to use, and whether it was named explicitly."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get("CW_SECRET_FILE")
    if env:
        return Path(env), True
    return default_path(), False


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_directories(path: Path, what: str = "secret file", elsewhere: str = ELSEWHERE) -> None:
    """
    Refuse C{path} (a file, existing or not) if a directory above it is not
    owned by this user or root, or is writable by group or others without
    the sticky bit: whoever could write there could replace the file.
    Symbolic links are followed, so the directories checked are the real
    ones.  C{what} names the file and C{elsewhere} says how to use another
    one, in the error messages.
    """
    real = Path(os.path.realpath(path))
    for directory in real.parents:
        try:
            info = directory.stat()
        except OSError as e:
            raise SecretError(
                f"cannot check directory {directory} of {what} {path}: {e.strerror}; {elsewhere}"
            ) from None
        mode = stat.S_IMODE(info.st_mode)
        if not _trusted_owner(info.st_uid):
            raise SecretError(
                f"{what} {path} is in directory {directory}, which belongs to"
                f" {_user(info.st_uid)}, not to you or root: that user could replace it."
                f"  Keep it in a directory of your own, {elsewhere}"
            )
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            raise SecretError(
                f"{what} {path} is in directory {directory}, which other users may write"
                f" to (mode {mode:04o}): they could replace it.  Fix it with: chmod go-w {directory}"
            )


def _write_all(fd: int, data: bytes) -> None:
    """Write all of C{data} to C{fd} (a separate function so tests can make it fail)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_private(
    path: Path, data: bytes, replace: bool = True, what: str = "secret file", elsewhere: str = ELSEWHERE
) -> None:
    """
    Write C{data} to C{path}, mode 0600, atomically: through a temporary
    file in the same directory, removed whatever happens.  Its directory is
    created (mode 0700) if missing and checked with L{check_directories}.
    If not C{replace}, an existing C{path} (a concurrent writer's) is kept.
    Raises L{SecretError} naming the path and the fix.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise SecretError(_write_failure(path, e, what, elsewhere)) from None
    check_directories(path, what, elsewhere)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            # link() fails if another process created the file first: keep theirs.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
    except OSError as e:
        raise SecretError(_write_failure(path, e, what, elsewhere)) from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # the directory went away or became unwritable: nothing left to remove


def _write_failure(path: Path, error: OSError, what: str, elsewhere: str) -> str:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space there, {elsewhere}"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        reason = "something on the way to it is not a directory"
        fix = f"remove or rename it, {elsewhere}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {path.parent} a directory you own and may write to, {elsewhere}"
    else:
        fix = elsewhere
    return f"cannot create {what} {path}: {reason}; {fix}"


def load_secret(explicit: str | os.PathLike | None = None) -> Secret:
    """
    Read (creating the default one if needed) and check the secret file;
    return the secret.  Raises L{SecretError} with what to do.
    """
    path, named = secret_path(explicit)
    try:
        exists = os.path.lexists(path) and path.exists()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror}; {ELSEWHERE}") from None
    if not exists:
        if named:
            raise SecretError(
                f"secret file {path} does not exist; copy the master's secret file"
                " there (mode 0600), or name the right one with --secret-file /"
                " CW_SECRET_FILE"
            )
        write_private(path, (secrets.token_hex(SECRET_BYTES) + "\n").encode(), replace=False)
    check_directories(path)
    try:
        info = path.stat()
        data = path.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror or e}; {ELSEWHERE}") from None
    if not _trusted_owner(info.st_uid):
        raise SecretError(
            f"secret file {path} belongs to {_user(info.st_uid)}, not to you"
            f" ({_user(os.geteuid())}) or root: whoever owns it knows the secret and can"
            f" change it.  Use a secret file of your own (chown {os.geteuid()} {path}"
            f" if it is yours), {ELSEWHERE}"
        )
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"secret file {path} is accessible by other users (mode"
            f" {stat.S_IMODE(info.st_mode):04o}); anyone who reads it can run code on"
            f" the cluster.  Fix it with: chmod 600 {path}"
        )
    if len(data) < MIN_SECRET:
        raise SecretError(
            f"secret file {path} holds {len(data)} bytes; use at least {MIN_SECRET}"
            f" (delete it to have cw create a new one)"
        )
    secret = Secret(data)
    secret.path = path
    return secret


def load_options_secret(options: usage.Options, program: str = "cw-master") -> bytes | None:
    """
    The secret named by C{--secret-file}/C{--insecure}.  A usage error if
    both are given; a bad secret file exits with one line saying what to
    fix (not twistd's whole usage text: the options were right).
    """
    if options["insecure"]:
        if options["secret-file"]:
            raise usage.UsageError("give either --insecure or --secret-file, not both")
        return None
    try:
        return load_secret(options["secret-file"])
    except SecretError as e:
        raise SystemExit(f"{program}: {e}") from None
