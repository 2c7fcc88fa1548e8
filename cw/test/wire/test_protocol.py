"""
Tests for L{cw.wire.commands}: argument types, record framing and the commands.
"""

from __future__ import annotations

import json

from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from cw.core.payload import Segments
from cw.core.records import (
    CHUNK,
    Job,
    Outcome,
    Result,
    batches,
    decode_jobs,
    decode_results,
    encode_jobs,
    encode_results,
    error_report,
    job_size,
    read_error_report,
    result_size,
)
from cw.test.peers import pattern
from cw.wire import commands as P
from cw.wire.commands import Blob


class Carry(amp.Command):
    """A command with two L{Blob} arguments and a L{Blob} response."""

    arguments = [(b"data", Blob()), (b"other", Blob())]
    response = [(b"data", Blob())]


def round_trip_arguments(command, **objects) -> tuple[amp.AmpBox, dict]:
    """
    Encode C{objects} as C{command}'s arguments, push the box through AMP's
    own wire format, and parse it back; return the box and the result.
    """
    proto = amp.AMP()
    box = command.makeArguments(objects, proto)
    [received] = amp.parseString(box.serialize())
    return box, command.parseArguments(received, proto)


def round_trip_response(command, **objects) -> dict:
    """Like L{round_trip_arguments}, for C{command}'s response."""
    proto = amp.AMP()
    box = command.makeResponse(objects, proto)
    [received] = amp.parseString(box.serialize())
    return command.parseResponse(received, proto)


class BlobTests(SynchronousTestCase):
    """L{Blob} carries byte strings of any length within AMP's per-value limit."""

    def assert_round_trip(self, data: bytes, other: bytes = b"") -> amp.AmpBox:
        box, parsed = round_trip_arguments(Carry, data=data, other=other)
        self.assertEqual(parsed, {"data": data, "other": other})
        for key, value in box.items():
            self.assertLessEqual(len(value), amp.MAX_VALUE_LENGTH, key)
        return box

    def test_chunks_fill_amp_values(self):
        """
        Data one byte longer than AMP's per-value limit travels as one full
        value and a one-byte one: chunks are as large as AMP allows.
        """
        box = self.assert_round_trip(b"x" * (amp.MAX_VALUE_LENGTH + 1))
        size = box.pop(P.size_key(b"data"))
        self.assertEqual(size, b"%d" % (amp.MAX_VALUE_LENGTH + 1), "the length, as a hint")
        sizes = sorted(len(value) for key, value in box.items() if key != b"other")
        self.assertEqual(sizes[-2:], [1, amp.MAX_VALUE_LENGTH])

    def test_segments_sent_as_joined(self):
        """A payload made as its parts (L{Segments}, not joined) travels as their concatenation."""
        parts = [b"head", pattern(CHUNK + 7), memoryview(pattern(3 * CHUNK))[5:]]
        _, parsed = round_trip_arguments(Carry, data=Segments(parts), other=b"")
        self.assertEqual(bytes(parsed["data"]), b"".join(parts))

    def test_empty(self):
        box = self.assert_round_trip(b"")
        self.assertEqual(box[b"data"], b"")
        self.assertNotIn(b"data.n", box)

    def test_exactly_one_chunk(self):
        data = pattern(CHUNK)
        box = self.assert_round_trip(data)
        self.assertEqual(box[b"data"], data)
        self.assertNotIn(b"data.n", box)
        self.assertNotIn(b"data.2", box)

    def test_one_byte_over(self):
        data = pattern(CHUNK + 1)
        box = self.assert_round_trip(data)
        self.assertEqual(box[b"data.n"], b"2")
        self.assertEqual(len(box[b"data"]), CHUNK)
        self.assertEqual(box[b"data.2"], data[-1:])
        self.assertNotIn(b"data.3", box)

    def test_exact_multiple_of_chunk(self):
        box = self.assert_round_trip(pattern(3 * CHUNK))
        self.assertEqual(box[b"data.n"], b"3")
        self.assertEqual(len(box[b"data.3"]), CHUNK)
        self.assertNotIn(b"data.4", box)

    def test_multi_megabyte(self):
        data = pattern(3 * 1024 * 1024 + 17)
        box = self.assert_round_trip(data, other=pattern(CHUNK * 2))
        self.assertEqual(int(box[b"data.n"]), -(-len(data) // CHUNK))
        self.assertEqual(box[b"other.n"], b"2")

    def test_values_that_look_like_markers(self):
        for value in [b"2", b"data.n", b"data.2", b"other.n", b"%d"]:
            self.assert_round_trip(value, other=value)

    def test_big_value_looking_like_markers(self):
        self.assert_round_trip(b"data.n=2;" * 20000, other=b"2")

    def test_bytearray_accepted(self):
        data = bytearray(pattern(CHUNK + 5))
        _, parsed = round_trip_arguments(Carry, data=data, other=bytearray(b"x"))
        self.assertEqual(parsed, {"data": bytes(data), "other": b"x"})

    def test_response(self):
        data = pattern(2 * CHUNK + 3)
        self.assertEqual(round_trip_response(Carry, data=data), {"data": data})

    def test_box_not_consumed_by_parsing(self):
        """Parsing works on a copy: the received box can be parsed again."""
        proto = amp.AMP()
        box = Carry.makeArguments({"data": pattern(CHUNK * 2), "other": b""}, proto)
        first = Carry.parseArguments(box, proto)
        self.assertEqual(Carry.parseArguments(box, proto), first)


class WireTests(SynchronousTestCase):
    """A box holding a multi-megabyte L{Blob} crosses AMP's real framing."""

    def setUp(self):
        self.data = pattern(5 * 1024 * 1024 + 1)
        proto = amp.AMP()
        box = Carry.makeArguments({"data": self.data, "other": b"small"}, proto)
        box[b"_command"] = b"Carry"
        box[b"_ask"] = b"1"
        self.wire = box.serialize()

    def test_plain_amp_value_would_be_too_long(self):
        box = amp.AmpBox({b"data": b"x" * (CHUNK + 1)})
        self.assertRaises(amp.TooLong, box.serialize)

    def test_parse_string(self):
        [box] = amp.parseString(self.wire)
        self.assertEqual(box[b"_command"], b"Carry")
        parsed = Carry.parseArguments(box, amp.AMP())
        self.assertEqual(parsed, {"data": self.data, "other": b"small"})

    def test_binary_box_protocol_in_fragments(self):
        """Fed to L{amp.BinaryBoxProtocol} in pieces, as TCP delivers it."""
        received = []

        class Receiver:
            def startReceivingBoxes(self, sender):
                pass

            def ampBoxReceived(self, box):
                received.append(box)

            def stopReceivingBoxes(self, reason):
                pass

        parser = amp.BinaryBoxProtocol(Receiver())
        parser.makeConnection(_NullTransport())
        for start in range(0, len(self.wire), 9973):
            parser.dataReceived(self.wire[start : start + 9973])
        [box] = received
        parsed = Carry.parseArguments(box, amp.AMP())
        self.assertEqual(parsed["data"], self.data)


class _NullTransport:
    """Just enough transport for L{amp.BinaryBoxProtocol.makeConnection}."""

    disconnecting = False

    def getPeer(self):
        return "peer"

    def getHost(self):
        return "host"

    def write(self, data):
        pass

    def loseConnection(self):
        pass


class JobRecordTests(SynchronousTestCase):
    """L{encode_jobs} and L{decode_jobs} frame job batches."""

    def setUp(self):
        self.jobs = [
            Job(3, 1, b"first payload", b'{"timeout":5}'),
            Job(3, 2, b"", b""),
            Job(2**32 - 1, 2**64 - 1, pattern(CHUNK + 10), b"{}"),
        ]

    def test_round_trip(self):
        self.assertEqual(decode_jobs(encode_jobs(self.jobs)), self.jobs)

    def test_empty(self):
        self.assertEqual(encode_jobs([]), b"")
        self.assertEqual(decode_jobs(b""), [])

    def test_generator_accepted(self):
        self.assertEqual(decode_jobs(encode_jobs(job for job in self.jobs)), self.jobs)

    def test_truncated(self):
        data = encode_jobs(self.jobs[:2])
        boundary = job_size(self.jobs[0])
        for cut in range(1, len(data)):
            if cut == boundary:
                self.assertEqual(decode_jobs(data[:cut]), self.jobs[:1])
            else:
                self.assertRaises(ValueError, decode_jobs, data[:cut])

    def test_trailing_garbage(self):
        self.assertRaises(ValueError, decode_jobs, encode_jobs(self.jobs) + b"\x00\x01")

    def test_size(self):
        for job in self.jobs:
            self.assertEqual(job_size(job), len(encode_jobs([job])))

    def test_key(self):
        self.assertEqual(self.jobs[0].key, (3, 1))


class ResultRecordTests(SynchronousTestCase):
    """L{encode_results} and L{decode_results} frame result batches."""

    def setUp(self):
        self.results = [
            Result(1, 1, Outcome.OK, b"value", b"printed\n", b"warned\n"),
            Result(1, 2, Outcome.RAISED, error_report("ValueError", "bad"), b"before failing\n"),
            Result(1, 3, Outcome.CRASHED, b""),
            Result(2**32 - 1, 2**64 - 1, Outcome.FAILED, pattern(CHUNK * 2)),
        ]

    def test_round_trip(self):
        self.assertEqual(decode_results(encode_results(self.results)), self.results)

    def test_empty(self):
        self.assertEqual(encode_results([]), b"")
        self.assertEqual(decode_results(b""), [])

    def test_truncated(self):
        data = encode_results(self.results[:2])
        boundary = result_size(self.results[0])
        for cut in range(1, len(data)):
            if cut == boundary:
                self.assertEqual(decode_results(data[:cut]), self.results[:1])
            else:
                self.assertRaises(ValueError, decode_results, data[:cut])

    def test_size(self):
        for result in self.results:
            self.assertEqual(result_size(result), len(encode_results([result])))

    def test_key_matches_job(self):
        self.assertEqual(Result(4, 9, Outcome.OK, b"").key, Job(4, 9, b"").key)


class OutputRecordTests(SynchronousTestCase):
    """L{P.Output} records: their framing in boxes, and on the pipe from a job process."""

    def setUp(self):
        self.outputs = [
            P.Output(1, 2, P.Stream.STDOUT, b"a line\n"),
            P.Output(1, 3, P.Stream.STDERR, b""),
            P.Output(2**32 - 1, 2**64 - 1, P.Stream.LOG, P.log_entry("job", 20, "hi", 1.5)),
        ]

    def test_round_trip(self):
        self.assertEqual(P.decode_outputs(P.encode_outputs(self.outputs)), self.outputs)
        for output in self.outputs:
            self.assertEqual(P.output_size(output), len(P.encode_outputs([output])))

    def test_truncated(self):
        data = P.encode_outputs(self.outputs[:1])
        for cut in range(1, len(data)):
            self.assertRaises(ValueError, P.decode_outputs, data[:cut])

    def test_command(self):
        box, parsed = round_trip_arguments(P.OutputNotice, host="node7", outputs=self.outputs)
        self.assertEqual(parsed, {"host": "node7", "outputs": self.outputs})

    def test_frames_in_pieces(self):
        """Frames split anywhere come out whole, in order; stray bytes come back as such."""
        stream = b"".join(P.output_frame(o) for o in self.outputs)
        stream = b"a warning printed early\n" + stream[:40] + stream[40:]
        for step in (1, 2, 7, 1000):
            frames = P.OutputFrames()
            got, stray = [], b""
            for start in range(0, len(stream), step):
                outputs, junk = frames.feed(stream[start : start + step])
                got += outputs
                stray += junk
            self.assertEqual(got, self.outputs)
            self.assertEqual(stray, b"a warning printed early\n")

    def test_bad_frame_skipped(self):
        """A frame with an unknown stream is stray bytes, and the next one still reads."""
        bad = P.OUTPUT_MAGIC + P.encode_outputs([P.Output(1, 1, 9, b"x")])
        good = P.output_frame(self.outputs[0])
        outputs, stray = P.OutputFrames().feed(bad + good)
        self.assertEqual(outputs, [self.outputs[0]])
        self.assertEqual(stray, bad)

    def test_log_entry(self):
        entry = P.read_log_entry(P.log_entry("a.b", 30, "careful", 12.5, "Traceback..."))
        self.assertEqual(
            entry,
            {"name": "a.b", "level": 30, "message": "careful", "created": 12.5, "exc_text": "Traceback..."},
        )
        for garbage in (b"\xff", b"[]", b'{"level": "high"}'):
            self.assertIsNone(P.read_log_entry(garbage))


class BatchesTests(SynchronousTestCase):
    """L{batches} splits records into consecutive lists under a byte limit."""

    def test_empty(self):
        self.assertEqual(list(batches([])), [])

    def test_all_fit(self):
        records = [b"a" * 10] * 5
        self.assertEqual(list(batches(records, limit=50)), [records])

    def test_split(self):
        records = [b"%d" % i * 4 for i in range(7)]
        self.assertEqual(
            list(batches(records, limit=10)),
            [records[0:2], records[2:4], records[4:6], records[6:7]],
        )

    def test_order_and_completeness(self):
        records = [b"x" * (i % 13) for i in range(200)]
        split = list(batches(records, limit=40))
        self.assertEqual([r for batch in split for r in batch], records)
        for batch in split:
            self.assertLessEqual(sum(map(len, batch)), 40)

    def test_oversized_record_alone(self):
        records = [b"a", b"b" * 100, b"c"]
        self.assertEqual(list(batches(records, limit=10)), [[b"a"], [b"b" * 100], [b"c"]])

    def test_custom_size(self):
        jobs = [Job(1, seq, b"p" * 100) for seq in range(10)]
        split = list(batches(jobs, job_size, limit=3 * job_size(jobs[0])))
        self.assertEqual([len(batch) for batch in split], [3, 3, 3, 1])

    def test_default_limit_packs_many_small_jobs(self):
        jobs = [Job(1, seq, b"p" * 10) for seq in range(10000)]
        self.assertEqual(len(list(batches(jobs, job_size))), 1)


class JSONTests(SynchronousTestCase):
    """The L{P.JSON} argument carries JSON values of any size."""

    def test_round_trip(self):
        value = {"cwd": "/h\u00f6me/\u96ea", "path": ["/a", ""], "n": 3, "x": None, "f": 1.5}
        self.assertEqual(round_trip_response(P.GetStatus, status=value), {"status": value})

    def test_large(self):
        value = {"path": ["/some/long/directory/%d" % i for i in range(20000)]}
        box, parsed = round_trip_arguments(P.ClientContext, client=1, context=value)
        self.assertIn(b"context.n", box)
        self.assertEqual(parsed["context"], value)

    def test_utf8_on_wire(self):
        box, _ = round_trip_arguments(P.ClientContext, client=1, context=["x"])
        self.assertEqual(json.loads(box[b"context"].decode("utf-8")), ["x"])


class CommandTests(SynchronousTestCase):
    """Every command's arguments and response survive encoding."""

    def test_register_client(self):
        context = {"cwd": "/tmp", "path": ["/tmp", "/usr/lib/python3"]}
        _, parsed = round_trip_arguments(
            P.RegisterClient,
            version=P.PROTOCOL_VERSION,
            host="n\u00f6de12",
            pid=4321,
            context=context,
            session="s\u00e9ance",
        )
        self.assertEqual(
            parsed,
            {
                "version": P.PROTOCOL_VERSION,
                "host": "n\u00f6de12",
                "pid": 4321,
                "context": context,
                "session": "s\u00e9ance",
                "versions": None,
            },
        )
        answer = {"client_id": 7, "max_payload": 1 << 40, "room_bytes": 1 << 30, "room_jobs": 10**7}
        self.assertEqual(
            round_trip_response(P.RegisterClient, **answer),
            {**answer, "mismatched": None, "references": None},
        )
        # The versions and the answer's mismatched workers are optional arguments (issue 17).
        versions = {"python": "3.11.7", "cloudpickle": "3.1.3"}
        box, parsed = round_trip_arguments(
            P.RegisterClient, version=3, host="h", pid=1, context=context, session="s", versions=versions
        )
        self.assertEqual(parsed["versions"], versions)
        mismatched = [{"worker": "w:1", "versions": versions, "reasons": ["x"]}]
        answer["mismatched"] = mismatched
        self.assertEqual(round_trip_response(P.RegisterClient, **answer), {**answer, "references": None})

    def test_job_room(self):
        _, parsed = round_trip_arguments(P.JobRoom, bytes=1 << 33, jobs=5)
        self.assertEqual(parsed, {"bytes": 1 << 33, "jobs": 5})

    def test_submit_jobs(self):
        jobs = [Job(0, seq, pattern(seq * 1000)) for seq in range(1, 200)]
        _, parsed = round_trip_arguments(P.SubmitJobs, jobs=jobs)
        self.assertEqual(parsed, {"jobs": jobs})

    def test_get_status(self):
        _, parsed = round_trip_arguments(P.GetStatus)
        self.assertEqual(parsed, {})
        status = {"queued": 3, "workers": [{"id": 1, "slots": 4}]}
        self.assertEqual(round_trip_response(P.GetStatus, status=status), {"status": status})

    def test_await_workers(self):
        _, parsed = round_trip_arguments(P.AwaitWorkers, count=5)
        self.assertEqual(parsed, {"count": 5})
        self.assertEqual(round_trip_response(P.AwaitWorkers, workers=6), {"workers": 6})

    def test_register_worker(self):
        _, parsed = round_trip_arguments(P.RegisterWorker, version=1, host="w1", pid=99, slots=16)
        given = {"version": 1, "host": "w1", "pid": 99, "slots": 16}
        self.assertEqual({k: parsed[k] for k in given}, given)
        # Arguments added since are optional: a worker that omits them parses.
        for name, value in parsed.items():
            if name not in given:
                self.assertIsNone(value, name)
        _, parsed = round_trip_arguments(
            P.RegisterWorker, version=1, host="w1", pid=99, slots=16, versions={"python": "3.12.0"}
        )
        self.assertEqual(parsed["versions"], {"python": "3.12.0"})
        capacity = {"cpus": 16, "gpus": ["0"], "tags": ["gpu"]}
        _, parsed = round_trip_arguments(
            P.RegisterWorker, version=1, host="w1", pid=99, slots=16, capacity=capacity
        )
        self.assertEqual(parsed["capacity"], capacity)
        self.assertEqual(
            round_trip_response(P.RegisterWorker, worker_id=2, max_payload=5),
            {"worker_id": 2, "max_payload": 5},
        )

    def test_probes(self):
        """L{P.ProbeWorkers} and L{P.Probe}: the context is optional."""
        _, parsed = round_trip_arguments(P.ProbeWorkers, packages=["numpy"], wait=2.5)
        self.assertEqual(parsed, {"packages": ["numpy"], "context": None, "wait": 2.5})
        context = {"cwd": "/w", "path": ["/w"]}
        _, parsed = round_trip_arguments(P.Probe, packages=[], context=context)
        self.assertEqual(parsed, {"packages": [], "context": context})
        workers = [{"id": 1, "peer": "w:1", "report": {"time": 1.5}}]
        self.assertEqual(round_trip_response(P.ProbeWorkers, workers=workers), {"workers": workers})

    def test_client_context(self):
        context = {"cwd": "/work", "path": ["/work"]}
        _, parsed = round_trip_arguments(P.ClientContext, client=3, context=context)
        self.assertEqual(parsed, {"client": 3, "context": context})

    def test_run_jobs(self):
        jobs = [Job(3, 1, pattern(CHUNK * 3), b'{"a":1}'), Job(4, 1, b"")]
        _, parsed = round_trip_arguments(P.RunJobs, jobs=jobs)
        self.assertEqual(parsed, {"jobs": jobs})

    def test_job_results(self):
        results = [Result(3, 1, Outcome.OK, pattern(CHUNK + 1)), Result(4, 1, Outcome.CRASHED, b"{}")]
        _, parsed = round_trip_arguments(P.JobResults, results=results)
        self.assertEqual(parsed, {"results": results})

    def test_run_batch(self):
        payload = pattern(2 * 1024 * 1024)
        arguments = {
            "jobs": [Job(3, 1, payload, b"", b"k" * 16), Job(4, 2, b"p")],
            "contexts": {"3": {"cwd": "/h\u00f6me/user", "path": ["/h\u00f6me/user", "/lib"]}},
            "functions": {(3, b"k" * 16): pattern(CHUNK + 5), (4, b"q"): b""},
        }
        _, parsed = round_trip_arguments(P.RunBatch, **arguments)
        self.assertEqual(parsed, {**arguments, "shared": None})
        shared = {"pid": 12, "fd": 5, "size": 10, "jobs": [[1, 0, 10]], "reply": 6}
        _, parsed = round_trip_arguments(P.RunBatch, **arguments, shared=shared)
        self.assertEqual(parsed, {**arguments, "shared": shared})
        results = [Result(3, 1, Outcome.RAISED, payload), Result(4, 2, Outcome.OK, b"")]
        answer = round_trip_response(P.RunBatch, results=results)
        self.assertEqual(answer, {"results": results, "shared": None})
        shared = {"size": 10, "results": [[1, 0, 10]]}
        answer = round_trip_response(P.RunBatch, results=results, shared=shared)
        self.assertEqual(answer, {"results": results, "shared": shared})

    def test_define_function(self):
        arguments = {"client": 7, "key": b"\x00" * 16, "function": pattern(CHUNK * 2 + 3)}
        _, parsed = round_trip_arguments(P.DefineFunction, **arguments)
        self.assertEqual(parsed, arguments)

    def test_malformed_function_table(self):
        data = P.encode_functions({(1, b"key"): b"function bytes"})
        for cut in range(1, len(data)):
            self.assertRaises(ValueError, P.decode_functions, data[:cut])

    def test_fire_and_forget_commands(self):
        for command in (P.SubmitJobs, P.ClientContext, P.RunJobs, P.JobResults):
            self.assertFalse(command.requiresAnswer, command)

    def test_version_mismatch_error_registered(self):
        for command in (P.RegisterClient, P.RegisterWorker):
            self.assertEqual(command.errors[P.VersionMismatch], b"VERSION_MISMATCH")


class ErrorReportTests(SynchronousTestCase):
    """L{error_report} makes JSON reports and L{read_error_report} reads any payload."""

    def test_round_trip(self):
        payload = error_report("KeyError", "'x'", "Traceback...\n", host="node1", pid=12)
        self.assertEqual(
            read_error_report(payload),
            {"type": "KeyError", "message": "'x'", "traceback": "Traceback...\n", "host": "node1", "pid": 12},
        )

    def test_is_utf8_json(self):
        payload = error_report("E", "caf\u00e9 \u2603")
        self.assertEqual(json.loads(payload.decode("utf-8"))["message"], "caf\u00e9 \u2603")

    def test_default_traceback(self):
        self.assertEqual(read_error_report(error_report("E", "m"))["traceback"], "")

    def assert_wrapped(self, payload: bytes) -> dict:
        report = read_error_report(payload)
        self.assertEqual(report["type"], "Error")
        self.assertEqual(report["traceback"], "")
        self.assertEqual(report["message"], repr(payload[:200]))
        return report

    def test_not_json(self):
        self.assert_wrapped(b"Segmentation fault")

    def test_not_utf8(self):
        self.assert_wrapped(b"\xff\xfe\x00garbage")

    def test_empty(self):
        self.assert_wrapped(b"")

    def test_json_but_not_an_object(self):
        self.assert_wrapped(b"[1, 2, 3]")
        self.assert_wrapped(b"null")
        self.assert_wrapped(b'"text"')

    def test_long_garbage_shortened(self):
        report = self.assert_wrapped(b"z" * 10000)
        self.assertLess(len(report["message"]), 300)


class CarryJobs(amp.Command):
    """A command with one L{P.JobBatch} argument."""

    arguments = [(b"jobs", P.JobBatch())]


def value_sizes(box: amp.AmpBox, name: bytes) -> list[int]:
    """The lengths of the wire values that carry argument C{name}, in order."""
    keys = [name] + sorted(
        (k for k in box if k.startswith(name + b".") and k not in (name + b".n", P.size_key(name))),
        key=lambda k: int(k.rsplit(b".", 1)[1]),
    )
    return [len(box[k]) for k in keys if k in box]


class FramingEdgeTests(SynchronousTestCase):
    """The framing's edges: chunk boundaries, field limits, truncation anywhere."""

    def test_chunk_boundaries(self):
        """Every value but the last is exactly CHUNK bytes, at and around the boundaries."""
        for size, expected in (
            (CHUNK - 1, [CHUNK - 1]),
            (CHUNK, [CHUNK]),
            (CHUNK + 1, [CHUNK, 1]),
            (2 * CHUNK, [CHUNK, CHUNK]),
        ):
            data = pattern(size)
            box, parsed = round_trip_arguments(Carry, data=data, other=b"")
            self.assertEqual(parsed["data"], data)
            self.assertEqual(value_sizes(box, b"data"), expected, size)

    def test_many_parts_straddle_chunks(self):
        """
        Records whose pieces straddle chunk boundaries are cut into full
        chunks (small copies where a chunk spans pieces) and come back whole.
        """
        jobs = [
            P.Job(1, seq, pattern(7_000 + 13 * seq), b'{"priority":1}', b"f" * (seq % 3)) for seq in range(40)
        ]
        box, parsed = round_trip_arguments(CarryJobs, jobs=jobs)
        self.assertEqual(parsed["jobs"], jobs)
        sizes = value_sizes(box, b"jobs")
        self.assertEqual(sum(sizes), len(P.encode_jobs(jobs)))
        self.assertEqual(sizes[:-1], [CHUNK] * (len(sizes) - 1))
        self.assertTrue(0 < sizes[-1] <= CHUNK)

    def test_truncated_anywhere(self):
        """
        Cut anywhere, an encoded batch either decodes to the whole records
        before the cut (at a record boundary) or raises ValueError, never
        another error and never a partial record.
        """
        jobs = [P.Job(1, 1, b"p" * 5, b'{"timeout":1}', b"key"), P.Job(1, 2, b"q" * 3, b"", b"")]
        results = [P.Result(1, 1, P.Outcome.OK, b"r" * 4), P.Result(1, 2, P.Outcome.RAISED, b"")]
        functions = {(1, b"k"): b"f" * 6, (2, b""): b""}
        cases = [
            (P.encode_jobs, P.decode_jobs, jobs),
            (P.encode_results, P.decode_results, results),
            (
                lambda t: P.encode_functions(dict(t)),
                lambda d: list(P.decode_functions(d).items()),
                list(functions.items()),
            ),
        ]
        for encode, decode, records in cases:
            boundaries = {len(encode(records[:n])): records[:n] for n in range(len(records) + 1)}
            data = encode(records)
            for cut in range(len(data) + 1):
                if cut in boundaries:
                    self.assertEqual(list(decode(data[:cut])), boundaries[cut], cut)
                else:
                    self.assertRaises(ValueError, decode, data[:cut])

    def test_empty_fields_round_trip(self):
        """A function with an empty key and body, a job with nothing in it, round-trip."""
        self.assertEqual(P.decode_functions(P.encode_functions({(3, b""): b""})), {(3, b""): b""})
        job = P.Job(0, 0, b"", b"", b"")
        self.assertEqual(P.decode_jobs(P.encode_jobs([job])), [job])

    def test_field_limits(self):
        """Options up to 65,535 bytes and function keys up to 255 bytes fit; one more is refused."""
        fits = [P.Job(1, 1, b"", b"o" * 0xFFFF, b"k" * 0xFF)]
        self.assertEqual(P.decode_jobs(P.encode_jobs(fits)), fits)
        self.assertRaises(ValueError, P.encode_jobs, [P.Job(1, 1, b"", b"o" * 0x10000, b"")])
        self.assertRaises(ValueError, P.encode_jobs, [P.Job(1, 1, b"", b"", b"k" * 0x100)])

    def test_valid_timeout(self):
        for value in (0.001, 0.5, 1, 10**9):
            self.assertTrue(P.valid_timeout(value), value)
        for value in (0, -1, float("inf"), float("nan"), True, "5", None):
            self.assertFalse(P.valid_timeout(value), value)

    def test_options_encoding(self):
        """No options travel as no bytes; given ones as compact JSON; junk reads as none."""
        self.assertEqual(P.encode_options(), b"")
        self.assertEqual(P.encode_options(timeout=None, priority=None), b"")
        self.assertEqual(P.encode_options(priority=3, timeout=None), b'{"priority":3}')
        self.assertEqual(P.read_options(P.Job(1, 1, b"", b"[1, 2]")), {})
        self.assertEqual(P.read_options(P.Job(1, 1, b"", b'{"priority":3}')), {"priority": 3})
