"""
A self-contained cw demo: start a local master and two workers, run the
square and executor examples against them, and stop everything again.

Usage: python examples/demo.py [PORT]    (default: cw.PORT, 5494)

The master listens on 127.0.0.1 only.  Pidfiles and logs of the local
cluster are kept under ~/.cache/cw/local-PORT/ while it runs.
"""

import os
import sys

# The example modules live beside this file; make them importable however
# the demo is started.  Jobs run with this client's sys.path, so the job
# processes import them (and their functions) the same way.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import executor  # noqa: E402
import square  # noqa: E402

import cw  # noqa: E402
import cw.mp  # noqa: E402


def main(port=cw.PORT):
    host = f"127.0.0.1:{port}"
    print(f"starting a local cw master on {host} and 2 workers...", flush=True)
    with cw.mp.allocate(2, port=port):
        print("\n== square.py: ClientThread with a callback ==", flush=True)
        square.main(host)
        print("\n== executor.py: ClusterExecutor ==", flush=True)
        executor.main(host)
        print("\nstopping the local cluster...", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else cw.PORT)
