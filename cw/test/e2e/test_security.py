"""
Security: nobody runs code on the cluster without the secret, and bad input
never hurts the master.  Real master and worker processes over loopback.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time

import cloudpickle
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols import amp
from twisted.trial import unittest

from cw.client import ClusterExecutor, MasterUnavailable, RemoteException, SubmitError
from cw.client.session import client_context
from cw.errors import AuthenticationFailed, SecretError
from cw.master.service import MasterService
from cw.test.jobs import square
from cw.test.peers import GatedAMP
from cw.test.procs import (
    DEADLINE,
    TWISTD,
    Processes,
    arguments_travel,
    child_env,
    executor,
    rss_kib,
    until,
    wait_until,
)
from cw.wire import commands as P
from cw.wire.auth import PREAUTH_BYTES, peer_proof
from cw.wire.commands import Challenge, Prove
from cw.wire.secret import load_secret


def write_marker(path):
    with open(path, "w") as f:
        f.write("ran")
    return path


def other_secret(testcase) -> str:
    path = os.path.abspath(testcase.mktemp())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not-the-right-secret-" + os.urandom(8).hex().encode())
    os.close(fd)
    return path


def raw_box(command: type[amp.Command], **kwargs) -> bytes:
    """The wire bytes of an AMP call of C{command} (asking for an answer)."""
    box = command.makeArguments(kwargs, None)
    box[b"_command"] = command.commandName
    box[b"_ask"] = b"1"
    return box.serialize()


def recv_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    """Read until the peer closes; fail if it does not within C{timeout}."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def host_port(address: str) -> tuple[str, int]:
    fields = dict(part.split("=", 1) for part in address.split(":")[1:])
    return fields["host"], int(fields["port"])


class SecretFileTests(unittest.TestCase):
    """Where the secret comes from and which files are refused."""

    def setUp(self):
        self.config = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "XDG_CONFIG_HOME": self.config})
        os.environ.pop("CW_SECRET_FILE", None)

    def test_default_created_private(self):
        """The default secret file is created on first use, mode 0600, in a 0700 directory."""
        secret = load_secret()
        path = os.path.join(self.config, "cw", "secret")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertGreaterEqual(len(secret), 32)
        self.assertEqual(load_secret(), secret)

    def test_world_readable_refused(self):
        """A secret file others can read is refused with the command that fixes it."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("x" * 40)
        os.chmod(path, 0o644)
        error = self.assertRaises(SecretError, load_secret, path)
        self.assertIn(f"chmod 600 {path}", str(error))

    def test_named_file_not_created(self):
        """An explicitly named secret file that is missing is an error, not created."""
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(SecretError, load_secret, path)
        self.assertIn("does not exist", str(error))
        self.assertFalse(os.path.exists(path))

    def test_short_secret_refused(self):
        path = os.path.abspath(self.mktemp())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"short")
        os.close(fd)
        self.assertIn("at least", str(self.assertRaises(SecretError, load_secret, path)))

    def test_master_refuses_readable_secret(self):
        """twistd cw-master with a world-readable secret exits with a clear message."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("x" * 40)
        os.chmod(path, 0o644)
        done = subprocess.run(
            [*TWISTD, "--nodaemon", "--pidfile=", "cw-master", "--secret-file", path, "--port", "tcp:0"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("chmod 600", done.stdout + done.stderr)


class AuthenticationTests(unittest.TestCase):
    """Clients and workers must share the master's secret, and vice versa."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_wrong_or_no_secret_cannot_submit(self):
        """A client with another secret, or none, is refused with a clear error."""

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            wrong = other_secret(self)
            with self.assertRaises(AuthenticationFailed) as caught:
                ClusterExecutor(self.procs.address, secret_file=wrong)
            self.assertIn("hold different secrets", str(caught.exception))
            with self.assertRaises(MasterUnavailable) as caught:
                ClusterExecutor(self.procs.address, insecure=True)
            self.assertIn("requires authentication", str(caught.exception))
            self.assertIn("before authenticating", self.procs.log_tail(self.procs.master, 50))

        return threads.deferToThread(body)

    def test_raw_submit_without_auth_runs_nothing(self):
        """
        A raw socket sending well-formed RegisterClient and SubmitJobs boxes
        without authenticating is closed, and the job never runs.
        """
        marker = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            job = P.Job(0, 1, cloudpickle.dumps((write_marker, (marker,), {})))
            data = raw_box(
                P.RegisterClient,
                version=P.PROTOCOL_VERSION,
                host="evil",
                pid=1,
                context=client_context(),
                session="evil",
            ) + raw_box(P.SubmitJobs, jobs=[job])
            with socket.create_connection(host_port(self.procs.address)) as sock:
                sock.sendall(data)
                recv_until_closed(sock)
            # FIFO: once a legitimate job has run, an accepted earlier one would have too.
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(square, 7).result(60), 49)
            self.assertFalse(os.path.exists(marker))
            self.assertIn("'RegisterClient' before authenticating", self.procs.log_tail(self.procs.master))

        return threads.deferToThread(body)

    def test_fake_master_cannot_run_jobs(self):
        """
        A worker refuses a master that does not prove the secret: one that
        pushes jobs at once is dropped, and one with another secret fails the
        handshake.  No job runs.
        """
        marker = os.path.abspath(self.mktemp())
        pushed = defer.Deferred()
        job = P.Job(1, 1, cloudpickle.dumps((write_marker, (marker,), {})))

        class Pusher(amp.AMP):
            def connectionMade(self):
                super().connectionMade()
                self.callRemote(P.ClientContext, client=1, context=client_context())
                self.callRemote(P.RunJobs, jobs=[job])

            def connectionLost(self, reason):
                super().connectionLost(reason)
                if not pushed.called:
                    pushed.callback(None)

        from twisted.internet.protocol import Factory

        port = reactor.listenTCP(0, Factory.forProtocol(Pusher), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        impostor = MasterService(
            "tcp:0:interface=127.0.0.1", reactor=reactor, secret=load_secret(other_secret(self))
        )

        @defer.inlineCallbacks
        def run():
            worker = yield threads.deferToThread(
                self.procs.start_worker, 1, False, address="127.0.0.1:%d" % port.getHost().port
            )
            yield pushed.addTimeout(DEADLINE, reactor)
            yield impostor.startService()
            self.addCleanup(impostor.stopService)
            fake = yield threads.deferToThread(
                self.procs.start_worker,
                1,
                False,
                address="127.0.0.1:%d" % impostor.port.getHost().port,
            )
            yield threads.deferToThread(
                wait_until,
                lambda: "hold different secrets" in self.procs.log_tail(fake, 100),
                what="the worker to reject the impostor",
            )
            self.assertEqual(impostor.master.workers, {})
            self.assertIn("before authenticating", self.procs.log_tail(worker, 100))
            self.assertFalse(os.path.exists(marker))

        return run()

    @defer.inlineCallbacks
    def test_wrong_proof_refused_by_real_master(self):
        """
        A peer that skips checking the master's proof and answers with a
        proof made from another secret is refused by a real master process,
        as a client and as a worker: Prove fails and the master hangs up.
        """
        yield threads.deferToThread(self.procs.start_master)
        host, port = host_port(self.procs.address)
        wrong = load_secret(other_secret(self))
        for role in ("client", "worker"):
            proto = yield connectProtocol(TCP4ClientEndpoint(reactor, host, port), GatedAMP())
            self.addCleanup(proto.transport.loseConnection)
            nonce = os.urandom(32)
            answer = yield proto.callRemote(Challenge, role=role, nonce=nonce, version=P.PROTOCOL_VERSION)
            yield self.assertFailure(
                proto.callRemote(Prove, proof=peer_proof(wrong, role, nonce, answer["nonce"])),
                AuthenticationFailed,
            )
            yield until(
                lambda t=proto.transport: not t.connected, timeout=10, what=f"the master to drop the {role}"
            )

    @defer.inlineCallbacks
    def test_replay_fails(self):
        """Replaying a recorded handshake on a new connection does not authenticate."""
        service = MasterService("tcp:0:interface=127.0.0.1", reactor=reactor, secret=load_secret())
        yield service.startService()
        self.addCleanup(service.stopService)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", service.port.getHost().port)

        recorded = {}
        first = yield connectProtocol(endpoint, GatedAMP())
        self.addCleanup(first.transport.loseConnection)
        recorded["nonce"] = os.urandom(32)
        answer = yield first.callRemote(
            Challenge, role="client", nonce=recorded["nonce"], version=P.PROTOCOL_VERSION
        )
        recorded["proof"] = peer_proof(load_secret(), "client", recorded["nonce"], answer["nonce"])
        yield first.callRemote(Prove, proof=recorded["proof"])

        second = yield connectProtocol(endpoint, GatedAMP())
        self.addCleanup(second.transport.loseConnection)
        again = yield second.callRemote(
            Challenge, role="client", nonce=recorded["nonce"], version=P.PROTOCOL_VERSION
        )
        self.assertNotEqual(again["nonce"], answer["nonce"])
        yield self.assertFailure(second.callRemote(Prove, proof=recorded["proof"]), AuthenticationFailed)
        self.assertFalse(service.master.clients)


class TLSTests(unittest.TestCase):
    """TLS on top of authentication, with certificates made by trustme."""

    timeout = 120

    def setUp(self):
        import trustme  # a test dependency: missing, the run fails (pip install '.[test]')

        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "ca"))
        ca = trustme.CA()
        ca.cert_pem.write_to_path(os.path.join(self.dir, "ca", "ca.pem"))
        server = ca.issue_cert("localhost")
        server.private_key_and_cert_chain_pem.write_to_path(os.path.join(self.dir, "server.pem"))
        client = ca.issue_cert("cw-client@example")
        client.private_key_and_cert_chain_pem.write_to_path(os.path.join(self.dir, "client.pem"))
        self.procs = Processes(self, os.path.join(self.dir, "run"))

    def address(self, port: int, certificate: bool = True) -> str:
        address = f"ssl:host=localhost:port={port}:caCertsDir={self.dir}/ca"
        if certificate:
            address += f":certKey={self.dir}/client.pem:privateKey={self.dir}/client.pem"
        return address

    def test_tls_end_to_end_with_client_certificates(self):
        """
        Master, worker and client over TLS with client certificates required;
        a client without a certificate is refused.
        """

        def body():
            plain = self.procs.start_master(
                listen=(
                    f"ssl:0:interface=127.0.0.1:privateKey={self.dir}/server.pem"
                    f":certKey={self.dir}/server.pem:caCerts={self.dir}/ca/ca.pem"
                )
            )
            port = host_port(plain)[1]
            self.procs.address = self.address(port)
            self.procs.start_worker()
            with executor(self.procs.address) as ex:
                self.assertEqual(
                    list(ex.map(square, range(10), timeout=DEADLINE)), [x * x for x in range(10)]
                )
            with self.assertRaises(MasterUnavailable) as caught:
                ClusterExecutor(self.address(port, certificate=False), connect_timeout=1)
            self.assertIn("check the certificates", str(caught.exception))
            # A plain-TCP client cannot talk to the TLS port either.
            with self.assertRaises(MasterUnavailable):
                ClusterExecutor(plain, connect_timeout=1)

        return threads.deferToThread(body)


#: Bytes that may get past a peer that is dropped for sending too much before
#: authenticating, beyond PREAUTH_BYTES: the master's last read (64 KiB) and
#: the kernels' buffers on loopback (the receiving window, a small send buffer).
PREAUTH_SLACK = 256 * 1024


class BadInputTests(unittest.TestCase):
    """Garbage, floods and slow peers against a real master process."""

    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def master_rss_kib(self) -> int:
        return rss_kib(self.procs.master.pid)

    def test_slow_and_oversized_peers_dropped(self):
        """
        A peer that sends one byte and then nothing is dropped after the
        authentication timeout; one that streams data without
        authenticating is dropped after PREAUTH_BYTES (16 KiB): of 6.5 MB
        offered, under PREAUTH_BYTES + PREAUTH_SLACK get through.
        """

        def body():
            self.procs.start_master("--auth-timeout", "1")
            self.procs.start_worker()
            target = host_port(self.procs.address)
            with socket.create_connection(target) as slow:
                slow.sendall(b"\x00")
                started = time.monotonic()
                recv_until_closed(slow, timeout=30)
                self.assertLess(time.monotonic() - started, 25)
            # Keys and maximal values, 6.5 MB of them, sent 1 KiB at a time
            # through a small send buffer, counting what the kernel took.
            stream = b"".join(
                struct.pack("!H", 3) + b"k%02d" % i + struct.pack("!H", 65535) + b"x" * 65535
                for i in range(100)
            )
            with socket.socket() as big:
                big.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                big.settimeout(10)
                big.connect(target)
                sent = 0
                try:
                    while sent < len(stream):
                        sent += big.send(stream[sent : sent + 1024])
                except (BrokenPipeError, ConnectionResetError):
                    pass
                recv_until_closed(big)
            # What was sent before the reset: what the master read (it drops
            # the peer once past PREAUTH_BYTES, reading at most 64 KiB at a
            # time) plus what sat in the two kernels' buffers on the way.
            self.assertLess(sent, PREAUTH_BYTES + PREAUTH_SLACK)
            log = self.procs.log_tail(self.procs.master, 100)
            self.assertIn("did not authenticate within 1 s", log)
            self.assertIn("without authenticating", log)
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(square, 3).result(60), 9)

        return threads.deferToThread(body)

    def test_connection_flood(self):
        """
        With more idle connections than --max-pending, the longest-waiting
        are dropped and a real client still gets in.
        """

        def body():
            self.procs.start_master("--max-pending", "5")
            self.procs.start_worker()
            target = host_port(self.procs.address)
            flood = [socket.create_connection(target) for _ in range(20)]
            try:
                with executor(self.procs.address) as ex:
                    self.assertEqual(ex.submit(square, 4).result(60), 16)
                closed = 0
                for sock in flood[:10]:
                    sock.settimeout(30)
                    try:
                        if sock.recv(1) == b"":
                            closed += 1
                    except ConnectionResetError:
                        closed += 1
                self.assertEqual(closed, 10)
            finally:
                for sock in flood:
                    sock.close()
            self.assertIn("waited longest", self.procs.log_tail(self.procs.master, 200))

        return threads.deferToThread(body)

    def test_fuzzed_boxes(self):
        """
        Random bytes and mutated AMP boxes, before and after a valid
        handshake prefix, never take the master down or make it grow
        without bound; it serves a normal client afterwards.
        """
        # A test dependency: missing, the run fails (pip install '.[test]').
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            target = host_port(self.procs.address)
            with executor(self.procs.address) as ex:
                ex.submit(square, 1).result(60)
            baseline = self.master_rss_kib()
            valid = [
                raw_box(Challenge, role="client", nonce=os.urandom(32), version=P.PROTOCOL_VERSION),
                raw_box(P.SubmitJobs, jobs=[P.Job(0, 1, b"x" * 100)]),
                raw_box(P.RegisterWorker, version=1, host="h", pid=1, slots=2, capacity={"cpus": 2}),
                raw_box(P.GetStatus),
            ]

            def mutate(data: bytes, edits) -> bytes:
                buf = bytearray(data)
                for pos, value in edits:
                    if buf:
                        buf[pos % len(buf)] = value
                return bytes(buf)

            @settings(
                max_examples=150,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(
                st.one_of(
                    st.binary(max_size=2000),
                    st.tuples(
                        st.sampled_from(valid),
                        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
                        st.integers(0, 400),
                    ).map(lambda t: mutate(t[0], t[1])[: t[2] or None]),
                    st.lists(st.sampled_from(valid), min_size=1, max_size=5).map(b"".join),
                )
            )
            def attack(data):
                with socket.create_connection(target) as sock:
                    try:
                        sock.sendall(data)
                        sock.shutdown(socket.SHUT_WR)
                        recv_until_closed(sock, timeout=30)
                    except TimeoutError:
                        raise
                    except OSError:
                        pass  # reset or already closed by the master: fine

            attack()
            self.assertIsNone(self.procs.master.poll(), "the master died")
            with executor(self.procs.address) as ex:
                self.assertEqual(
                    list(ex.map(square, range(20), timeout=DEADLINE)), [x * x for x in range(20)]
                )
            grown = self.master_rss_kib() - baseline
            self.assertLess(grown, 50 * 1024, f"master RSS grew by {grown} KiB")

        return threads.deferToThread(body)


def make_bytes(n):
    return b"r" * n


class LimitTests(unittest.TestCase):
    """The payload limit (--max-payload) is enforced at every end."""

    timeout = 120

    def test_payload_limit(self):
        """
        A job over the limit is refused at submit; a result over it fails
        that job only; a peer sending a box over it is dropped.
        """
        procs = Processes(self, self.mktemp())
        arguments_travel(self)  # the boxes must carry the bytes, not references to them

        def body():
            procs.start_master("--max-payload", "100000")
            procs.start_worker()
            # Dropped peers do not come back here (see test_failover for reconnecting).
            with executor(procs.address, reconnect_timeout=0) as ex:
                with self.assertRaises(SubmitError) as caught:
                    ex.submit(len, b"x" * 200000)
                self.assertIn("over the master's limit of 100,000", str(caught.exception))
                error = ex.submit(make_bytes, 200000).exception(60)
                self.assertIsInstance(error, RemoteException)
                self.assertEqual(error.type, "PayloadTooLarge")
                self.assertIn("result", str(error))
                self.assertEqual(len(ex.submit(make_bytes, 50000).result(60)), 50000)
                # Bypass the client's own check: the master refuses the job...
                ex.session.max_payload = 10**9
                refused = ex.submit(len, b"y" * 300000).exception(60)
                self.assertEqual(refused.type, "PayloadTooLarge")
                # ...and drops a peer whose message outgrows any allowed batch.
                doomed = ex.submit(len, b"z" * 3_000_000)
                self.assertIsInstance(doomed.exception(60), MasterUnavailable)
            self.assertIn("sent a message of over", procs.log_tail(procs.master, 50))

        return threads.deferToThread(body)


class InsecureTests(unittest.TestCase):
    """--insecure is an explicit, logged opt-out that both ends must choose."""

    timeout = 120

    def test_insecure_opt_out(self):
        procs = Processes(self, self.mktemp())

        def body():
            procs.start_master("--insecure")
            self.assertIn("--insecure", procs.log_tail(procs.master, 30))
            with self.assertRaises(AuthenticationFailed) as caught:
                ClusterExecutor(procs.address)
            self.assertIn("runs with --insecure", str(caught.exception))
            procs.start_worker(1, False, "--insecure")
            from cw.client import wait_for_workers

            self.assertEqual(wait_for_workers(1, procs.address, timeout=60, insecure=True), 1)
            with executor(procs.address, insecure=True) as ex:
                self.assertEqual(ex.submit(square, 12).result(60), 144)

        return threads.deferToThread(body)
