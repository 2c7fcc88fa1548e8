"""
The packaging test: a regular (non-editable) install ships the twistd
plugins, so C{twistd --help} lists C{cw-master} and C{cw-worker}.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig

from twisted.internet import threads
from twisted.trial import unittest

from cw.test.procs import ROOT


class InstallTests(unittest.TestCase):
    timeout = 300

    def test_regular_install_lists_plugins(self):
        """
        Install the project with pip into an empty target directory and run
        twistd with only that directory and the dependencies on sys.path (no
        checkout, no .pth files): both plugins are listed, and cw is
        imported from the installed copy.
        """
        if not os.path.exists(os.path.join(ROOT, "setup.cfg")):
            raise unittest.SkipTest("not running from a source checkout")
        target = os.path.abspath(self.mktemp())

        def body():
            pip = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--no-build-isolation",
                    "--target",
                    target,
                    ROOT,
                ],
                capture_output=True,
                text=True,
                timeout=240,
            )
            self.assertEqual(pip.returncode, 0, pip.stderr)
            plugins = os.path.join(target, "twisted", "plugins")
            self.assertTrue(os.path.exists(os.path.join(plugins, "cw_plugin.py")))
            self.assertFalse(os.path.exists(os.path.join(plugins, "__init__.py")))
            # -S: no site module, so no .pth file can put the checkout back.
            deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
            code = (
                "import sys; sys.path[1:1] = %r; sys.path.insert(0, %r);"
                "import cw; print('cw from', cw.__file__);"
                "from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help']; run()"
            ) % (deps, target)
            out = subprocess.run(
                [sys.executable, "-S", "-c", code],
                capture_output=True,
                text=True,
                cwd=target,
                env={"PATH": os.environ.get("PATH", "")},
                timeout=120,
            )
            self.assertIn("cw from " + os.path.join(target, "cw"), out.stdout, out.stderr)
            self.assertIn("cw-master", out.stdout)
            self.assertIn("cw-worker", out.stdout)

        return threads.deferToThread(body)
