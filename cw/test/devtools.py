"""
Headless Chromium driven over the DevTools protocol, for tests of the web
dashboard.

Chromium is started with C{--remote-debugging-pipe}: it reads commands from
its file descriptor 3 and writes answers and events to descriptor 4, each a
JSON message ended by a NUL byte.  No port is opened and nothing beyond the
standard library is needed.  Every wait has a deadline, and the process (with
its process group) is stopped by PID in the test's cleanup.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from cw.test.procs import stop_process

#: The Chromium binary, if installed (Debian: C{apt-get install chromium}).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Options that keep headless Chromium off the network and out of any profile.
OPTIONS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
]


class DevToolsError(Exception):
    """Chromium answered a command with an error."""


class Browser:
    """
    One headless Chromium with one page.

    @param testcase: stopping Chromium is registered as its cleanup.
    @param profile: an empty directory for Chromium's user data.
    """

    def __init__(self, testcase, profile: Path, width: int = 1280, height: int = 900) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        to_chrome, commands = os.pipe()
        answers, from_chrome = os.pipe()
        self.popen = subprocess.Popen(
            # bash puts the pipes on descriptors 3 and 4, then execs Chromium (same PID).
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{to_chrome} 4>&{from_chrome}',
                "chromium",
                CHROMIUM,
                *OPTIONS,
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(to_chrome, from_chrome),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(profile),
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._out = os.fdopen(commands, "wb", buffering=0)
        self._in = os.fdopen(answers, "rb", buffering=0)
        testcase.addCleanup(self.close)
        #: Every event received, oldest first.
        self.events: list[dict] = []
        self._replies: dict[int, dict] = {}
        self._closed = False
        self._cond = threading.Condition()
        self._next = 0
        threading.Thread(target=self._read, name="devtools-reader", daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=self.session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=self.session,
        )

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._in.read(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        """Send one command and wait (at most C{timeout} s) for its result."""
        with self._cond:
            self._next += 1
            ident = self._next
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        return reply["result"]

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=self.session)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.session
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.write_bytes(base64.b64decode(data))

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, C{console.error} calls and error log entries (failed loads) so far."""
        errors = []
        with self._cond:
            events = list(self.events)
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", "")[:500])
        return errors

    def close(self) -> None:
        """Ask Chromium to quit, then stop it and its process group by PID."""
        if self.popen.poll() is None and not self._closed:
            try:
                self.send("Browser.close", timeout=5)
            except (TimeoutError, DevToolsError, OSError):
                pass
        stop_process(self.popen, timeout=10)
        for f in (self._out, self._in):
            try:
                f.close()
            except OSError:
                pass
