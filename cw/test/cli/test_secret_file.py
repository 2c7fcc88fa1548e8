"""
The secret file's checks, as OpenSSH's C{StrictModes} (L{cw.wire.secret}): who
owns it and the directories above it, who may write those directories, and
every filesystem error while creating or reading it, each a L{SecretError}
that names the path and the fix, with no temporary file left behind; and
the command-line programs report it in one line.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from cw.errors import SecretError
from cw.test.procs import TWISTD, child_env
from cw.wire import secret as secret
from cw.wire.secret import load_secret

#: A user id that is neither root nor the user running the tests.
NOBODY = 65534


def write_secret(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s" * 40 + "\n")
    os.chmod(path, mode)
    return path


def leftovers(directory: Path) -> list[str]:
    """Temporary files a failed write would leave in C{directory}."""
    return (
        sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp")) if directory.is_dir() else []
    )


def needs_root(testcase) -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("not root: cannot give a file to another user")


class SecretFileTests(unittest.TestCase):
    """Each unsafe or unusable secret file gives its L{SecretError}."""

    def setUp(self):
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(mode=0o700, parents=True)
        self.config = self.base / "config"
        self.patch(os, "environ", {**os.environ, "XDG_CONFIG_HOME": str(self.config)})
        os.environ.pop("CW_SECRET_FILE", None)

    def refused(self, path=None) -> str:
        return str(self.assertRaises(SecretError, load_secret, path))

    def test_owned_by_another_user(self):
        """A 0600 secret file that belongs to another user is refused, naming its owner."""
        needs_root(self)
        path = write_secret(self.base / "theirs")
        os.chown(path, NOBODY, NOBODY)
        message = self.refused(path)
        self.assertIn(f"secret file {path} belongs to", message)
        self.assertIn(f"uid {NOBODY}", message)
        os.chown(path, os.geteuid(), os.getegid())
        self.assertEqual(load_secret(path), b"s" * 40)

    def test_directory_of_another_user(self):
        """A secret file in a directory another user owns (and could replace it in) is refused."""
        needs_root(self)
        directory = self.base / "theirs"
        path = write_secret(directory / "secret")
        os.chmod(directory, 0o755)
        os.chown(directory, NOBODY, NOBODY)
        message = self.refused(path)
        self.assertIn(f"directory {directory}, which belongs to", message)

    def test_group_or_world_writable_directory(self):
        """A secret in a directory others may write to is refused with the chmod that fixes it."""
        directory = self.base / "shared"
        path = write_secret(directory / "secret")
        for mode in (0o777, 0o770, 0o757):
            os.chmod(directory, mode)
            message = self.refused(path)
            self.assertIn(f"{path} is in directory {directory}, which other users may write", message)
            self.assertIn(f"chmod go-w {directory}", message)
        os.chmod(directory, 0o755)
        self.assertEqual(load_secret(path), b"s" * 40)

    def test_ancestor_writable(self):
        """Not only the parent: every directory above the file is checked."""
        top = self.base / "top"
        path = write_secret(top / "a" / "b" / "secret")
        os.chmod(top, 0o777)
        self.assertIn(f"directory {top}, which other users may write", self.refused(path))

    def test_sticky_directory_accepted(self):
        """A world-writable sticky directory (like /tmp) is fine: others cannot replace what is in it."""
        directory = self.base / "tmp"
        path = write_secret(directory / "secret")
        os.chmod(directory, 0o1777)
        self.assertEqual(load_secret(path), b"s" * 40)

    def test_symlink_into_writable_directory(self):
        """The real location counts: a link from a safe directory to an unsafe one is refused."""
        unsafe = self.base / "unsafe"
        target = write_secret(unsafe / "secret")
        os.chmod(unsafe, 0o777)
        link = self.base / "link"
        link.symlink_to(target)
        self.assertIn(f"directory {unsafe}, which other users may write", self.refused(link))

    def test_default_config_directory_writable(self):
        """
        An existing config directory with mode 0777 is refused rather than
        used, and no secret is created in it.
        """
        directory = self.config / "cw"
        directory.mkdir(parents=True)
        os.chmod(directory, 0o777)
        message = self.refused()
        self.assertIn(f"chmod go-w {directory}", message)
        self.assertEqual(list(directory.iterdir()), [])

    def test_config_location_not_a_directory(self):
        """A config location that is a file: an error naming the path, nothing left behind."""
        self.config.write_text("not a directory\n")
        message = self.refused()
        self.assertIn(f"cannot create secret file {self.config / 'cw' / 'secret'}", message)
        self.assertIn("not a directory", message)
        self.assertIn("--secret-file", message)
        self.assertEqual(sorted(p.name for p in self.base.iterdir()), ["config"])

    def test_config_location_full(self):
        """
        A full filesystem (ENOSPC from the write) gives an error that says
        so; neither the temporary file nor a partial secret is left.
        """

        def full(fd, data):
            os.write(fd, data[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(secret, "_write_all", full)
        message = self.refused()
        path = self.config / "cw" / "secret"
        self.assertIn(f"cannot create secret file {path}: No space left on device", message)
        self.assertIn("free some space", message)
        self.assertEqual(leftovers(path.parent), [])
        self.assertFalse(path.exists())

    def test_config_location_unwritable(self):
        """
        A directory this user may not write to (as root, where modes do not
        stop it, the refusal is simulated at C{os.open}) gives an error
        naming the directory; nothing is left behind.
        """
        directory = self.config / "cw"
        directory.mkdir(parents=True, mode=0o700)
        if os.geteuid() == 0:
            real_open = os.open

            def refusing_open(path, *args, **kwargs):
                if str(path).startswith(str(directory)):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real_open(path, *args, **kwargs)

            self.patch(os, "open", refusing_open)
        else:
            os.chmod(directory, 0o500)
            self.addCleanup(os.chmod, directory, 0o700)
        message = self.refused()
        self.assertIn(f"cannot create secret file {directory / 'secret'}: Permission denied", message)
        self.assertIn(f"make {directory} a directory you own and may write to", message)
        self.assertEqual(leftovers(directory), [])

    def test_unreadable(self):
        """A secret path that cannot be read (here a directory) is an error naming it."""
        path = self.base / "secret"
        path.mkdir()
        self.assertIn(f"cannot read secret file {path}: Is a directory", self.refused(path))

    def test_created_private(self):
        """The default file is created 0600 in a 0700 directory, without a temporary file left."""
        created = load_secret()
        path = self.config / "cw" / "secret"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        self.assertEqual(leftovers(path.parent), [])
        self.assertEqual(load_secret(), created)


class CommandLineTests(unittest.TestCase):
    """cw-master, cw-worker and cw say what is wrong with the secret in one line."""

    def setUp(self):
        directory = Path(self.mktemp()).absolute()
        self.path = write_secret(directory / "secret")
        os.chmod(directory, 0o777)

    def one_line(self, command: list[str], program: str, what: str | None = None, **env: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(**env), timeout=60)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        lines = (done.stdout + done.stderr).strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        if what is None:
            what = f"secret file {self.path} is in directory"
        self.assertTrue(lines[0].startswith(f"{program}: {what}"), lines)

    def test_master(self):
        self.one_line(
            [
                *TWISTD,
                "--nodaemon",
                "--pidfile=",
                "cw-master",
                "--secret-file",
                str(self.path),
                "--port",
                "tcp:0",
            ],
            "cw-master",
        )

    def test_worker(self):
        self.one_line(
            [
                *TWISTD,
                "--nodaemon",
                "--pidfile=",
                "cw-worker",
                "--secret-file",
                str(self.path),
                "localhost:1",
            ],
            "cw-worker",
        )

    def test_status(self):
        self.one_line(
            [
                sys.executable,
                "-m",
                "cw.cli",
                "status",
                "--master",
                "127.0.0.1:1",
                "--secret-file",
                str(self.path),
            ],
            "cw status",
        )

    def test_status_no_slurm_master(self):
        """C{cw status} with no master given and no SLURM master running: one line too, no traceback."""
        directory = Path(self.mktemp()).absolute()
        self.one_line(
            [sys.executable, "-m", "cw.cli", "status", "--secret-file", str(self.path)],
            "cw status",
            "",  # no master job, or no SLURM here: either is one line
            CW_BACKEND="slurm",
            CW_SLURM_DIR=str(directory),
            CW_MASTER="",
        )
