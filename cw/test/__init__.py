"""
cw's trial suite.

Every test process and every process a test starts authenticates with a
secret file made for this test run (C{CW_SECRET_FILE}), so the suite never
reads or creates the user's own C{~/.config/cw/secret}.  The cluster backend
is pinned to local processes (C{CW_BACKEND=local}).
"""

import atexit
import os
import secrets
import shutil
import signal
import tempfile

if not os.environ.get("CW_TEST_SECRET_FILE"):
    _dir = tempfile.mkdtemp(prefix="cw-test-secret-")
    atexit.register(shutil.rmtree, _dir, True)
    _path = os.path.join(_dir, "secret")
    with open(os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as _f:
        _f.write(secrets.token_hex(32))
    os.environ["CW_TEST_SECRET_FILE"] = _path
os.environ["CW_SECRET_FILE"] = os.environ["CW_TEST_SECRET_FILE"]
# Clients given no master, and cw.start, use local processes, even where a
# SLURM controller answers (as in CI); cw.test.launch.test_slurm unsets this.
os.environ["CW_BACKEND"] = "local"
os.environ.pop("CW_INSECURE", None)
# A run started in the background by a non-interactive shell inherits
# SIGINT ignored, and so would every process the tests start, which then
# could not be stopped with SIGINT as the tests do: restore it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
