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
of its own.  A file that group or others may read is refused.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cw.errors import CWError

#: Bytes of randomness in a generated secret (written as hex).
SECRET_BYTES = 32
#: Shortest secret accepted from a file.
MIN_SECRET = 16


class SecretError(CWError):
    """The secret file is missing, unsafe or unusable."""


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


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
    finally:
        os.close(fd)
    try:
        # link() fails if another process created the file first: keep theirs.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def load_secret(explicit: str | os.PathLike | None = None) -> bytes:
    """
    Read (creating the default one if needed) and check the secret file;
    return the secret.  Raises L{SecretError} with what to do.
    """
    path, named = secret_path(explicit)
    if not path.exists():
        if named:
            raise SecretError(
                f"secret file {path} does not exist; copy the master's secret file"
                " there (mode 0600), or name the right one with --secret-file /"
                " CW_SECRET_FILE"
            )
        _create(path)
    try:
        info = path.stat()
        data = path.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e}") from None
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
    return data
