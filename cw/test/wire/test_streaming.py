"""
Tests for L{cw.wire.streaming}: big boxes written piece by piece as the
transport asks for more, and chunked values received into one buffer.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from cw.system import address_of, unfilled_bytearray
from cw.test.peers import pattern
from cw.test.procs import memory_files
from cw.wire import commands as P
from cw.wire import memfile, streaming
from cw.wire.liveness import SignsOfLife
from cw.wire.streaming import PIECE, ChunkReceiver, StreamingSender

try:
    import numpy
except ImportError:  # NumPy is in the test extra; without it, its case is left out
    numpy = None


class Sender(StreamingSender, amp.AMP):
    pass


class Receiver(ChunkReceiver, amp.AMP):
    def __init__(self):
        super().__init__()
        self.boxes = []

    def ampBoxReceived(self, box):
        self.boxes.append(box)


def jobs_box(jobs) -> amp.AmpBox:
    box = amp.AmpBox()
    P.JobBatch().toBox(b"jobs", box, {"jobs": jobs}, None)
    return box


class StreamingSenderTests(SynchronousTestCase):
    def setUp(self):
        self.transport = StringTransport()
        self.sender = Sender()
        self.sender.makeConnection(self.transport)

    def pump(self) -> int:
        """Let the transport ask for pieces until the sender is done; return how many."""
        pieces = 0
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
            pieces += 1
        return pieces

    def test_small_box_written_at_once(self):
        self.sender.sendBox(amp.AmpBox(a=b"1"))
        self.assertIsNone(self.transport.producer)
        self.assertEqual(self.transport.value(), amp.AmpBox(a=b"1").serialize())

    def test_big_box_written_in_pieces_then_queued_boxes(self):
        jobs = [P.Job(1, 1, pattern(5 * PIECE + 17)), P.Job(1, 2, b"small")]
        big = jobs_box(jobs)
        expected = big.serialize() + amp.AmpBox(after=b"x").serialize()
        self.sender.sendBox(big)
        self.assertIsNotNone(self.transport.producer, "a pull producer is registered")
        self.assertLessEqual(len(self.transport.value()), PIECE)
        self.assertGreater(self.sender.outgoing_bytes, 4 * PIECE)
        self.sender.sendBox(amp.AmpBox(after=b"x"))  # waits its turn
        self.assertGreaterEqual(self.pump(), 5)
        self.assertEqual(self.transport.value(), expected)
        self.assertEqual(self.sender.outgoing_bytes, 0)

    def test_lost_connection_drops_the_rest(self):
        self.sender.sendBox(jobs_box([P.Job(1, 1, pattern(3 * PIECE))]))
        self.sender.stopProducing()
        self.assertEqual(self.sender.outgoing_bytes, 0)
        self.sender.resumeProducing()  # nothing left: no error


class WatchedSender(SignsOfLife, StreamingSender, amp.AMP):
    pass


class DrainedTests(SynchronousTestCase):
    def test_peer_taking_in_a_streamed_box_is_a_sign_of_life(self):
        """
        Each time the transport asks for more of a streamed box, the peer
        took in the last piece: it counts as hearing from it (its heartbeat
        answer waits behind the box); writing the first piece does not.
        """
        clock = Clock()
        transport = StringTransport()
        sender = WatchedSender()
        sender.liveness_clock = clock
        sender.makeConnection(transport)
        sender.sendBox(jobs_box([P.Job(1, 1, pattern(3 * PIECE))]))
        clock.advance(10)
        transport.producer.resumeProducing()
        self.assertEqual(sender.last_heard, 0.0, "nothing taken in yet")
        clock.advance(10)
        transport.producer.resumeProducing()
        self.assertEqual(sender.last_heard, 20.0)


class ChunkReceiverTests(SynchronousTestCase):
    def receive(self, wire: bytes) -> Receiver:
        receiver = Receiver()
        receiver.makeConnection(StringTransport())
        for start in range(0, len(wire), 7000):
            receiver.dataReceived(wire[start : start + 7000])
        return receiver

    def test_chunks_joined_into_one_value(self):
        jobs = [P.Job(3, 1, pattern(10 * P.CHUNK + 5), b"{}", b"k" * 16), P.Job(3, 2, b"tiny")]
        [box] = self.receive(jobs_box(jobs).serialize()).boxes
        self.assertEqual(sorted(box), [b"jobs"], "no chunk keys are left in the box")
        self.assertIsInstance(box[b"jobs"], memoryview)
        self.assertEqual(P.decode_jobs(box[b"jobs"]), jobs)

    def test_payloads_writable(self):
        """
        A big payload is a writable view of the received buffer, so that
        arrays a payload carries out of band load writable without a copy
        (L{cw.wire.pickling}).
        """
        [box] = self.receive(jobs_box([P.Job(3, 1, pattern(3 * P.CHUNK))]).serialize()).boxes
        [job] = P.decode_jobs(box[b"jobs"])
        self.assertIsInstance(job.payload, memoryview)
        self.assertFalse(job.payload.readonly)

    def test_parsed_by_blob(self):
        payload = pattern(3 * P.CHUNK)
        box = amp.AmpBox()
        P.Blob().toBox(b"payload", box, {"payload": payload}, None)
        [received] = self.receive(box.serialize()).boxes
        objects = {}
        P.Blob().fromBox(b"payload", dict(received), objects, None)
        self.assertEqual(bytes(objects["payload"]), payload)

    def test_missing_chunk_refused(self):
        box = jobs_box([P.Job(3, 1, pattern(4 * P.CHUNK))])
        del box[P.chunk_key(b"jobs", 3, 1)]
        [received] = self.receive(box.serialize()).boxes
        self.assertRaises((ValueError, KeyError), P.JobBatch().fromBox, b"jobs", dict(received), {}, None)

    def assembled(self, payload: bytes, size: bytes | None) -> tuple[bytes, list, list]:
        """
        C{payload} sent as a chunked L{P.Blob} whose size key says C{size}
        (None: left out): what arrived, the lengths of the unfilled buffers
        allocated and the ranges mapped ahead of the writes.
        """
        box = amp.AmpBox()
        P.Blob().toBox(b"payload", box, {"payload": payload}, None)
        self.assertEqual(box.pop(P.size_key(b"payload")), b"%d" % len(payload))
        if size is not None:
            box[P.size_key(b"payload")] = size
        allocated, mapped = [], []

        def unfilled(length):
            allocated.append(length)
            return unfilled_bytearray(length)

        self.patch(streaming, "unfilled_bytearray", unfilled)
        self.patch(streaming, "populate_range", lambda buffer, start, end: mapped.append((start, end)))
        [received] = self.receive(box.serialize()).boxes
        self.assertEqual(sorted(received), [b"payload"], "no chunk or size keys are left in the box")
        return bytes(received[b"payload"]), allocated, mapped

    def test_value_with_its_size_assembled_in_place(self):
        """
        A big chunked value that says its length is received into one
        buffer of that length, allocated once and mapped a window at a
        time ahead of the writes, every byte once.
        """
        payload = pattern(3 * streaming.POPULATE_WINDOW + 12345)
        value, allocated, mapped = self.assembled(payload, b"%d" % len(payload))
        self.assertEqual(value, payload)
        self.assertEqual(allocated, [len(payload)])
        self.assertEqual(mapped[0][0], P.CHUNK, "the first chunk is copied in before")
        starts, ends = [start for start, _ in mapped[1:]], [end for _, end in mapped[:-1]]
        self.assertEqual(starts, ends, "each byte mapped once")
        self.assertEqual(mapped[-1][1], len(payload))
        self.assertLessEqual(len(mapped), 4)

    def test_wrong_or_missing_size_still_assembled(self):
        """
        The size is a hint: a value longer or shorter than it says, or one
        saying nothing, unbelievable or malformed, arrives whole and exact
        (a shorter one is cut: no unfilled byte is seen).
        """
        payload = pattern(2 * streaming.ASSEMBLE_IN_PLACE_ABOVE + 7)
        for size, buffers in [
            (b"%d" % (len(payload) - 100_000), 1),
            (b"%d" % (len(payload) + 100_000), 1),
            (None, 0),
            (b"%d" % (1 << 63), 0),
            (b"-5", 0),
            (b"12x", 0),
            (b"%d" % (streaming.ASSEMBLE_IN_PLACE_ABOVE - 1), 0),
        ]:
            value, allocated, _ = self.assembled(payload, size)
            self.assertEqual(value, payload, size)
            self.assertEqual(len(allocated), buffers, size)

    def test_big_reads_while_a_big_value_arrives(self):
        """
        From the start of a big value that says its length to the end of
        its box, the connection reads L{streaming.BIG_READ} bytes at a time
        (L{cw.wire.private.set_read_size}); not for a value that does not say.
        """
        sizes = []
        self.patch(
            streaming, "set_read_size", lambda transport, size, reuse=False, plan=None: sizes.append(size)
        )
        payload = pattern(2 * streaming.ASSEMBLE_IN_PLACE_ABOVE)
        wire = blob_wire(payload)
        receiver = self.receive(wire[:-100])
        self.assertEqual(sizes, [streaming.BIG_READ])
        receiver.dataReceived(wire[-100:])
        self.assertEqual(sizes, [streaming.BIG_READ, None], "back to the usual size once the box ended")
        self.assertEqual(bytes(receiver.boxes[0][b"payload"]), payload)
        self.receive(blob_wire(payload, size=b"unsaid"))
        self.assertEqual(sizes, [streaming.BIG_READ, None])

    def test_unallocatable_size_still_assembled(self):
        """A size no buffer can be allocated for (C{MemoryError}) falls back to growing one."""

        def refuse(length):
            raise MemoryError()

        self.patch(streaming, "unfilled_bytearray", refuse)
        payload = pattern(2 * streaming.ASSEMBLE_IN_PLACE_ABOVE)
        box = amp.AmpBox()
        P.Blob().toBox(b"payload", box, {"payload": payload}, None)
        [received] = self.receive(box.serialize()).boxes
        self.assertEqual(bytes(received[b"payload"]), payload)


class FileReceiver(Receiver):
    """Receives the big chunked values named C{in_file} into memory files, C{lead} bytes in."""

    in_file = (b"payload", b"jobs")
    lead = 0

    def assemble_in_file(self, name, first):
        return self.lead if name in self.in_file else None


def blob_wire(payload: bytes, size: bytes | None = None, name: bytes = b"payload") -> bytes:
    """A box holding C{payload} as a chunked L{P.Blob}, its size key saying C{size} (None: its length)."""
    box = amp.AmpBox(_command=b"x")
    P.Blob().toBox(name, box, {name.decode(): payload}, None)
    if size is not None:
        box[P.size_key(name)] = size
    return box.serialize()


def feed(receiver, wire: bytes, cuts) -> None:
    """Give C{wire} to C{receiver} in reads ending at each of C{cuts} (sorted), then the rest."""
    at = 0
    for cut in [*cuts, len(wire)]:
        if cut > at:
            receiver.dataReceived(wire[at:cut])
            at = cut


class FileAssemblyTests(SynchronousTestCase):
    """
    A big chunked value whose receiver asks for it (L{ChunkReceiver.assemble_in_file})
    is written into a memory file as it arrives and put in the box as a
    view of a copy-on-write mapping of that file once whole.
    """

    def setUp(self):
        gc.collect()
        self.files_before = memory_files()

    def files_held(self) -> int:
        gc.collect()
        return memory_files() - self.files_before

    def receive(self, wire: bytes, cuts=(), lead: int = 0) -> FileReceiver:
        receiver = FileReceiver()
        receiver.lead = lead
        receiver.makeConnection(StringTransport())
        feed(receiver, wire, cuts)
        return receiver

    def test_value_received_into_a_file(self):
        payload = pattern(3 * streaming.ASSEMBLE_IN_PLACE_ABOVE + 12345)
        [box] = self.receive(blob_wire(payload), range(0, 4 << 20, 7000), lead=40).boxes
        self.assertEqual(sorted(box), [b"_command", b"payload"])
        value = box[b"payload"]
        self.assertEqual(bytes(value), payload)
        mapping, offset = memfile.placed(value)
        self.assertEqual(offset, 40, "placed where the receiver asked")
        seals = fcntl.fcntl(mapping.fd, getattr(fcntl, "F_GET_SEALS", 1034))
        self.assertTrue(seals & getattr(fcntl, "F_SEAL_SHRINK", 2), "it never shrinks under its mapping")
        self.assertFalse(value.readonly, "writable, as in memory")
        value[0] ^= 0xFF
        self.assertEqual(os.pread(mapping.fd, 1, 40), payload[:1], "a write stays in this process")
        self.assertGreater(self.files_held(), 0)
        del value, mapping, box
        self.assertEqual(self.files_held(), 0, "the file goes with the last view of it")

    def test_only_values_asked_for(self):
        """Other values, small ones and ones that do not say their length are assembled in memory."""
        payload = pattern(2 * streaming.ASSEMBLE_IN_PLACE_ABOVE)
        for wire in (
            blob_wire(payload, name=b"other"),
            blob_wire(payload, size=b"x"),
            blob_wire(pattern(streaming.ASSEMBLE_IN_PLACE_ABOVE - 1)),
        ):
            [box] = self.receive(wire).boxes
            value = [v for k, v in box.items() if k != b"_command"][0]
            self.assertIsNone(memfile.placed(value))
            self.assertEqual(bytes(value), payload if len(value) == len(payload) else bytes(value))

    @settings(max_examples=40, deadline=None)
    @given(
        st.lists(st.integers(0, 3 * P.CHUNK + 600), max_size=6),
        st.sampled_from([0, 5, -100_000, 100_000]),
    )
    def test_exact_however_cut_and_whatever_size_said(self, cuts, wrong_by):
        """
        Cut into reads anywhere (inside chunks, keys and length prefixes),
        with a size that is right, short or long, the value arrives exact
        and the boxes after it too.
        """
        payload = pattern(streaming.ASSEMBLE_IN_PLACE_ABOVE + 3 * P.CHUNK // 2)
        wire = (
            blob_wire(payload, size=b"%d" % (len(payload) + wrong_by)) + amp.AmpBox(_command=b"y").serialize()
        )
        start = len(wire) - 4 * P.CHUNK
        receiver = self.receive(wire, sorted({0, *(start + cut for cut in cuts)}))
        self.assertEqual(len(receiver.boxes), 2)
        self.assertEqual(bytes(receiver.boxes[0][b"payload"]), payload)
        self.assertEqual(receiver.boxes[1], {b"_command": b"y"})
        receiver = None

    def test_file_closed_when_the_box_never_completes(self):
        wire = blob_wire(pattern(3 * streaming.ASSEMBLE_IN_PLACE_ABOVE))
        receiver = self.receive(wire[: len(wire) // 2])
        self.assertEqual(self.files_held(), 1)
        receiver.connectionLost(failure.Failure(error.ConnectionDone()))
        del receiver
        self.assertEqual(self.files_held(), 0)

    def test_goes_on_in_memory_when_the_file_fails(self):
        """A file that cannot be written (out of memory) leaves the value whole, in memory."""
        payload = pattern(3 * streaming.ASSEMBLE_IN_PLACE_ABOVE)
        pwrite = os.pwrite

        def filling(fd, data, offset):
            if offset >= 200_000:  # after some of it was written
                raise OSError(28, "No space left on device")
            return pwrite(fd, data, offset)

        self.patch(os, "pwrite", filling)
        [box] = self.receive(blob_wire(payload), range(0, len(payload), 10_000)).boxes
        self.assertEqual(bytes(box[b"payload"]), payload)
        self.assertIsNone(memfile.placed(box[b"payload"]))
        self.assertEqual(self.files_held(), 0)

    def test_no_file_to_be_made_assembled_in_memory(self):
        def refuse():
            raise OSError(24, "Too many open files")

        self.patch(memfile, "create", refuse)
        payload = pattern(2 * streaming.ASSEMBLE_IN_PLACE_ABOVE)
        [box] = self.receive(blob_wire(payload)).boxes
        self.assertEqual(bytes(box[b"payload"]), payload)


class SpareBufferTests(SynchronousTestCase):
    """
    A receiver with L{ChunkReceiver.spare_buffers} (the client) assembles a
    big value in the buffer of an earlier one once nothing uses that any
    more, never while anything does, and keeps none for long.
    """

    SIZE = 2 * streaming.ASSEMBLE_IN_PLACE_ABOVE + 7

    def setUp(self):
        self.clock = Clock()
        self.receiver = Receiver()
        self.receiver.spare_buffers = streaming.SpareBuffers(self.clock)
        self.receiver.makeConnection(StringTransport())

    def value(self, payload: bytes, cuts=()) -> memoryview:
        feed(self.receiver, blob_wire(payload), cuts)
        [box] = self.receiver.boxes
        self.receiver.boxes = []
        return box[b"payload"]

    def test_buffer_reused_once_unused(self):
        first = self.value(os.urandom(self.SIZE))
        where = address_of(first)
        bytes(first)  # loaded into objects of its own, as a bytes result is
        del first
        payload = os.urandom(self.SIZE)
        second = self.value(payload, range(0, self.SIZE, 70_000))
        self.assertEqual(address_of(second), where, "assembled where the first one was")
        self.assertEqual(bytes(second), payload)
        self.assertFalse(second.readonly)
        self.assertEqual(len(self.receiver.spare_buffers), 1)

    def test_shorter_value_in_a_kept_buffer(self):
        first = self.value(os.urandom(self.SIZE))
        where = address_of(first)
        del first
        payload = os.urandom(self.SIZE * 4 // 5)
        second = self.value(payload)
        self.assertEqual(address_of(second), where)
        self.assertEqual(bytes(second), payload, "cut to its length")
        del second
        third = self.value(os.urandom(self.SIZE // 2))
        self.assertNotEqual(address_of(third), where, "a value much shorter gets a buffer of its length")

    def test_value_in_use_never_reused(self):
        """
        Whatever refers to a value's buffer (the value, a view of part of
        it, a buffer of it handed to pickle, an array built on it) keeps
        it from the values that follow, which leave it as it was.
        """
        holders = [lambda v: v, lambda v: v[1000:2000], lambda v: pickle.PickleBuffer(v)]
        if numpy is not None:
            holders.append(lambda v: numpy.frombuffer(v, dtype="u1")[5:])
        for hold in holders:
            kept = hold(self.value(os.urandom(self.SIZE)))
            expected = bytes(memoryview(kept))
            for _ in range(2):
                self.assertNotEqual(address_of(self.value(os.urandom(self.SIZE))), address_of(kept))
            self.assertEqual(bytes(memoryview(kept)), expected)
            del kept

    def test_one_spare_kept_when_many_are_let_go(self):
        """Values let go of all at once leave one spare buffer besides the one the next value takes."""
        values = [self.value(os.urandom(self.SIZE)) for _ in range(4)]
        self.assertEqual(len(self.receiver.spare_buffers), 4)
        addresses = {address_of(value) for value in values}
        del values
        payload = os.urandom(self.SIZE)
        value = self.value(payload)
        self.assertIn(address_of(value), addresses)
        self.assertEqual(bytes(value), payload)
        self.assertEqual(len(self.receiver.spare_buffers), 2)

    def test_cut_off_value_leaves_nothing(self):
        """
        A box cut off by a lost connection leaves its buffer for the next
        value at once (not once its protocol is collected), and nothing is
        kept once values stop coming for L{streaming.SPARE_KEPT} seconds.
        """
        wire = blob_wire(os.urandom(self.SIZE))
        payload = os.urandom(self.SIZE)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        feed(self.receiver, wire[: len(wire) // 2], ())
        self.receiver.connectionLost(failure.Failure(error.ConnectionDone()))
        receiver = Receiver()
        receiver.spare_buffers = self.receiver.spare_buffers
        receiver.makeConnection(StringTransport())
        self.receiver = receiver
        value = self.value(payload)
        self.assertEqual(bytes(value), payload)
        self.assertEqual(len(receiver.spare_buffers), 1, "the cut-off value's buffer reused")
        self.clock.advance(streaming.SPARE_KEPT - 1)
        self.assertEqual(len(receiver.spare_buffers), 1)
        self.clock.advance(1)
        self.assertEqual(len(receiver.spare_buffers), 0)
        self.assertEqual(bytes(value), payload, "a value in use stays valid")
        del value
        self.assertLess(tracemalloc.get_traced_memory()[0] - before, streaming.ASSEMBLE_IN_PLACE_ABOVE)

    def test_kept_after_a_slow_value(self):
        """A value that took longer than SPARE_KEPT to arrive: its buffer kept SPARE_KEPT after its end."""
        wire = blob_wire(os.urandom(self.SIZE))
        feed(self.receiver, wire[: len(wire) // 2], ())
        self.clock.advance(streaming.SPARE_KEPT + 1)
        feed(self.receiver, wire[len(wire) // 2 :], ())
        [box] = self.receiver.boxes
        self.receiver.boxes = []
        where = address_of(box[b"payload"])
        del box
        self.clock.advance(streaming.SPARE_KEPT - 1)
        self.assertEqual(address_of(self.value(os.urandom(self.SIZE))), where)

    def test_reads_into_a_buffer_of_the_connection(self):
        """While such a value arrives, a TCP connection reads into one buffer (L{private.set_read_size})."""
        calls = []

        def set_read_size(transport, size, reuse=False, plan=None):
            calls.append((size, reuse))

        self.patch(streaming, "set_read_size", set_read_size)
        self.value(os.urandom(self.SIZE))
        reads = self.receiver.spare_buffers.reads(streaming.BIG_READ)
        self.assertEqual(calls, [(streaming.BIG_READ, reads), (None, False)])
        self.assertIs(calls[0][1], reads, "the spare buffers' read buffer")
        self.receiver.spare_buffers.clear()
        again = self.receiver.spare_buffers.reads(streaming.BIG_READ)
        self.assertIsNot(again, reads, "dropped with the spares")

    def test_a_few_bytes_longer_fits(self):
        """
        A kept buffer is a little longer than its value (L{streaming.SPARE_SLACK}): the next
        value, a few kilobytes longer (the master's next job, its pickle a
        little different), is assembled in it too.
        """
        first = self.value(os.urandom(self.SIZE))
        where = address_of(first)
        del first
        payload = os.urandom(self.SIZE + 5000)
        second = self.value(payload)
        self.assertEqual(address_of(second), where)
        self.assertEqual(bytes(second), payload)

    def test_shared_by_connections(self):
        """
        Connections sharing one L{streaming.SpareBuffers} (the master's)
        read into one buffer, and one assembles its value in the buffer of
        another's once nothing uses it, never while anything does.
        """
        other = Receiver()
        other.spare_buffers = self.receiver.spare_buffers
        other.makeConnection(StringTransport())
        calls = []
        self.patch(
            streaming, "set_read_size", lambda transport, size, reuse=False, plan=None: calls.append(reuse)
        )
        kept_payload = os.urandom(self.SIZE)
        kept = self.value(kept_payload)
        feed(other, blob_wire(os.urandom(self.SIZE)), range(0, self.SIZE, 100_000))
        [box] = other.boxes
        other.boxes = []
        self.assertNotEqual(address_of(box[b"payload"]), address_of(kept))
        self.assertEqual(bytes(kept), kept_payload, "a value in use stays as it arrived")
        where = address_of(kept)
        del kept, box
        for _ in range(2):
            payload = os.urandom(self.SIZE)
            feed(other, blob_wire(payload), ())
            [box] = other.boxes
            other.boxes = []
            self.assertEqual(bytes(box[b"payload"]), payload)
            del box
        self.assertEqual(len(self.receiver.spare_buffers), 2, "two buffers for two values at once, no more")
        self.assertIn(where, {address_of(buffer) for buffer in self.receiver.spare_buffers._buffers})
        self.assertEqual(len({id(reuse) for reuse in calls if reuse is not False}), 1, "one read buffer")

    def test_only_values_that_say_their_length(self):
        """Small values and values of unknown length are assembled as before, in memory of their own."""
        for wire in (blob_wire(pattern(self.SIZE), size=b"x"), blob_wire(pattern(P.CHUNK * 3))):
            feed(self.receiver, wire, ())
        self.assertEqual(len(self.receiver.spare_buffers), 0)
        got = [bytes(box[b"payload"]) for box in self.receiver.boxes]
        self.assertEqual(got, [pattern(self.SIZE), pattern(P.CHUNK * 3)])


class PlainReceiver(amp.AMP):
    """Twisted's own box parser, to compare with L{ChunkReceiver}'s."""

    def __init__(self):
        super().__init__()
        self.boxes = []

    def ampBoxReceived(self, box):
        self.boxes.append(box)


def joined(box) -> dict:
    """C{box} with each chunked value joined under its name, as L{ChunkReceiver} leaves it."""
    out = {key: bytes(value) for key, value in box.items()}
    for key in [key for key in out if key.endswith(b".n")]:
        name, count = key[:-2], int(out.pop(key))
        out.pop(P.size_key(name), None)
        width = len(str(count))
        out[name] += b"".join(out.pop(P.chunk_key(name, i, width)) for i in range(2, count + 1))
    return out


class ParserTests(SynchronousTestCase):
    """
    L{ChunkReceiver} parses what arrives itself: however the bytes are cut
    into reads, it yields the boxes Twisted's parser yields (chunked
    values joined), keys and values of every size, and refuses what
    Twisted refuses.
    """

    def boxes(self) -> list:
        small = amp.AmpBox(_command=b"x", a=b"", b=b"1" * 300)
        blobs = amp.AmpBox(_command=b"y")
        P.Blob().toBox(b"one", blobs, {"one": pattern(5 * P.CHUNK + 77)}, None)
        P.Blob().toBox(b"two", blobs, {"two": pattern(2 * P.CHUNK)}, None)
        P.Blob().toBox(b"three", blobs, {"three": pattern(P.CHUNK)}, None)  # one full chunk
        big = jobs_box([P.Job(1, 1, pattern(12 * P.CHUNK + 1)), P.Job(1, 2, b"z")])
        return [small, blobs, big, amp.AmpBox(_answer=b"1", k=b"v" * P.CHUNK)]

    def feed(self, receiver, wire: bytes, sizes, reads: bytearray | None = None) -> None:
        """
        Give C{wire} to C{receiver} in reads of C{sizes} (in turn); given
        C{reads}, each as a view of it, overwritten after each read, as a
        connection reading into one buffer does (L{cw.wire.private.set_read_size}).
        """
        receiver.makeConnection(StringTransport())
        at, turn = 0, 0
        while at < len(wire):
            size = sizes[turn % len(sizes)]
            if reads is None:
                receiver.dataReceived(wire[at : at + size])
            else:
                piece = wire[at : at + size]
                reads[: len(piece)] = piece
                receiver.dataReceived(memoryview(reads)[: len(piece)])
                reads[:] = b"\xee" * len(reads)
            at, turn = at + size, turn + 1

    def test_same_boxes_as_twisted_however_cut(self):
        boxes = self.boxes()
        wire = b"".join(box.serialize() for box in boxes)
        plain = PlainReceiver()
        self.feed(plain, wire, [len(wire)])
        expected = [joined(box) for box in plain.boxes]
        self.assertEqual(len(expected), len(boxes))
        for sizes in (
            [1],
            [2],
            [3, 1],
            [7000],
            [P.CHUNK],
            [P.CHUNK + 2, 1],
            [1 << 16],
            [1 << 20],
            [len(wire)],
        ):
            receiver = Receiver()
            self.feed(receiver, wire, sizes)
            self.assertEqual([joined(box) for box in receiver.boxes], expected, f"reads of {sizes}")

    def test_reads_into_one_buffer(self):
        """
        Reads handed on as views of one buffer, overwritten after each
        (a connection reading into one buffer, as the client's does while
        a big value arrives), yield the same boxes: nothing of a read is
        kept without a copy.
        """
        boxes = self.boxes()
        big = pattern(streaming.ASSEMBLE_IN_PLACE_ABOVE + 3 * P.CHUNK)  # assembled in place
        wire = b"".join(box.serialize() for box in boxes) + blob_wire(big)
        expected = [joined(box) for box in boxes] + [{b"_command": b"x", b"payload": big}]
        for sizes in ([3, 1], [7000], [P.CHUNK + 2, 1], [1 << 20], [len(wire)]):
            for spare in (False, True):
                receiver = Receiver()
                if spare:
                    receiver.spare_buffers = streaming.SpareBuffers(Clock())
                self.feed(receiver, wire, sizes, bytearray(max(sizes)))
                got = [joined(box) for box in receiver.boxes]
                self.assertEqual(got, expected, f"reads of {sizes}")

    def test_paused_parses_nothing_until_resumed(self):
        boxes = self.boxes()
        wire = b"".join(box.serialize() for box in boxes)
        receiver = Receiver()
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(wire[:100])
        receiver.paused = True
        receiver.dataReceived(wire[100:])
        self.assertEqual(receiver.boxes, [])
        receiver.paused = False
        receiver.dataReceived(b"")
        self.assertEqual(len(receiver.boxes), len(boxes))
        self.assertEqual(joined(receiver.boxes[2]), joined(boxes[2]))

    def test_overlong_key_refused(self):
        transport = StringTransport()
        receiver = Receiver()
        receiver.makeConnection(transport)
        receiver.dataReceived(b"\x01\x00" + b"k" * 256)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(receiver.boxes, [])


def planned_feed(receiver, wire: bytes, steps) -> int:
    """
    Give C{wire} to C{receiver} as its TCP connection would with reads in
    place (L{ChunkReceiver.read_plan}): each read of at most the next of
    C{steps} bytes (cycled) goes where the receiver's plan says, if it has
    one, as C{recvmsg_into} fills its views, else is handed over as bytes.
    The bytes of values taken where they were read (not copied).
    """
    at, i, placed = 0, 0, [0]
    taken = receiver._chunk_in_place

    def counted(chunk, length):
        placed[0] += length
        taken(chunk, length)

    receiver._chunk_in_place = counted
    while at < len(wire):
        step = steps[i % len(steps)]
        i += 1
        plan = receiver.read_plan()
        if plan is None:
            receiver.dataReceived(wire[at : at + step])
            at += step
            continue
        length = 0
        for view in plan.views:
            take = min(len(view), step - length, len(wire) - at - length)
            view[:take] = wire[at + length : at + length + take]
            length += take
        receiver.dataReceived(plan.received(length))
        at += length
    del receiver._chunk_in_place
    return placed[0]


class InPlaceReadTests(SynchronousTestCase):
    """
    While a big value that said its length arrives in memory, a receiver
    with spare buffers (the master, the client) reads its chunks straight
    into the value's buffer, with the keys between them, as it would have
    parsed them (L{ChunkReceiver.read_plan}): the value arrives whole,
    checked by its MAC, whatever the reads, and nothing else changes.
    """

    def setUp(self):
        self.clock = Clock()

    def receiver(self, kind=Receiver):
        receiver = kind()
        receiver.spare_buffers = streaming.SpareBuffers(self.clock)
        receiver.makeConnection(StringTransport())
        return receiver

    def test_values_whole_whatever_the_reads(self):
        receiver = self.receiver()
        for size in (3 << 20, P.CHUNK * 40, P.CHUNK * 40 + 1, (5 << 20) - 3):
            payload = os.urandom(size)
            for steps in ([100_000, streaming.BIG_READ], [70_001], [1000, 300_000, 7], [P.CHUNK + 19]):
                wire = blob_wire(payload) + blob_wire(b"small") + blob_wire(payload[: 2 << 20])
                placed = planned_feed(receiver, wire, steps)
                # All but the first chunk (and a read's worth), with big reads.
                most = 0.9 if steps[-1] == streaming.BIG_READ else 0.5
                self.assertGreater(placed, size * most, (size, steps))
                got = [bytes(box[b"payload"]) for box in receiver.boxes]
                receiver.boxes = []
                self.assertEqual(got, [payload, b"small", payload[: 2 << 20]], (size, steps))
        # No view of a kept buffer is left behind: each can still grow.
        for buffer in receiver.spare_buffers._buffers:
            buffer.append(0)

    def test_longer_or_shorter_than_said(self):
        """A value whose size key says otherwise than its chunks: assembled as before, from what arrived."""
        receiver = self.receiver()
        payload = os.urandom(3 << 20)
        for said in (len(payload) + 100_000, len(payload) - P.CHUNK - 5):
            planned_feed(receiver, blob_wire(payload, size=b"%d" % said), [100_000, streaming.BIG_READ])
            [box] = receiver.boxes
            receiver.boxes = []
            self.assertEqual(bytes(box[b"payload"]), payload, said)

    def test_signed(self):
        """With session keys, the MAC checks the bytes read in place: a changed one fails it."""
        from cw.test.wire.test_session_mac import SignedPeer
        from cw.wire.auth import session_keys

        keys = session_keys(b"s" * 32, "client", b"p" * 32, b"m" * 32)
        payload = os.urandom(3 << 20)
        for flip in (None, 2 << 20):
            sender, receiver = SignedPeer(), self.receiver(SignedPeer)
            sender.makeConnection(StringTransport())
            sender.start_session(*keys)
            receiver.start_session(*reversed(keys))
            sender.mark_authenticated()
            receiver.mark_authenticated()
            box = amp.AmpBox(_command=b"x")
            P.Blob().toBox(b"payload", box, {"payload": payload}, None)
            sender.sendBox(box)
            while sender.transport.producer is not None:
                sender.transport.producer.resumeProducing()
            wire = bytearray(sender.transport.value())
            if flip is not None:
                wire[flip] ^= 1
            self.assertGreater(
                planned_feed(receiver, bytes(wire), [100_000, streaming.BIG_READ]), len(payload) // 2
            )
            if flip is None:
                self.assertIsNone(receiver.rejected)
                self.assertEqual(bytes(receiver.boxes[0][b"payload"]), payload)
            else:
                self.assertIn("wrong MAC", receiver.rejected)
                self.assertEqual(receiver.boxes, [])
