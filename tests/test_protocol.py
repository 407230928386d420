"""The frame layout: what decode accepts, and that it refuses everything else with
ProtocolError (which the daemons count, log and drop) rather than crashing."""

from __future__ import annotations

import os
import threading

import msgpack
import pytest
import zmq

from farpool import protocol
from farpool.errors import ProtocolError, VersionMismatch
from farpool.protocol import Kind, Status


def test_round_trip_tasks_and_results():
    frames = protocol.encode(Kind.TASKS, [[[7, b"k" * 16, 1, 2]]], [b"fn", b"a", b"b"])
    msg = protocol.decode(frames)
    assert msg.kind is Kind.TASKS
    (entry,) = msg.body[0]
    assert entry == protocol.TaskEntry(7, b"k" * 16, 1, 2) and entry.nframes == 3
    assert msg.frames == [b"fn", b"a", b"b"]
    msg = protocol.decode(protocol.encode(Kind.RESULTS, [[[7, int(Status.OK), 1, 0.5]]], [b"r"]))
    assert msg.body[0][0] == protocol.ResultEntry(7, Status.OK, 1, 0.5)


def test_header_encoding_is_plain_msgpack_from_any_thread():
    """encode reuses a msgpack Packer per thread: the bytes on the wire stay exactly
    msgpack.packb's, whichever thread packs and however many at once."""
    body = [[[5, b"k" * 16, 0, 1]]]
    assert protocol.encode(Kind.TASKS, body, [b"a"]) == [msgpack.packb([V, int(Kind.TASKS), body]), b"a"]
    assert protocol.encode(Kind.BYE, ("why",)) == [msgpack.packb([V, int(Kind.BYE), ["why"]])]
    errors = []

    def pack_many(n):
        for i in range(2000):
            want = msgpack.packb([V, int(Kind.CANCEL), [[n, i]]])
            if protocol.encode(Kind.CANCEL, [[n, i]]) != [want]:
                errors.append((n, i))

    # A body msgpack cannot pack raises, and leaves nothing behind for the next one.
    with pytest.raises(TypeError):
        protocol.encode(Kind.HELLO, [{"not packable": {1, 2}}])
    assert protocol.encode(Kind.BYE, ["a"]) == [msgpack.packb([V, int(Kind.BYE), ["a"]])]
    threads = [threading.Thread(target=pack_many, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_decode_reads_a_header_from_a_frame_bytes_or_memoryview():
    header, payload = protocol.encode(Kind.RESULTS, [[[3, int(Status.OK), 1, 2]]], [b"r"])
    for frame in (header, memoryview(header), bytearray(header), zmq.Frame(header)):
        msg = protocol.decode([frame, payload])
        # An integer duration (msgpack keeps 2.0 as 2 only if the sender wrote an int)
        # still comes out as a float.
        assert msg.body[0] == [protocol.ResultEntry(3, Status.OK, 1, 2.0)]
        assert type(msg.body[0][0].duration) is float


def test_an_oversized_header_frame_is_refused_before_it_is_copied():
    big = zmq.Frame(b"\x00" * (protocol.MAX_HEADER_BYTES + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode([big])


V = protocol.PROTOCOL_VERSION


def head(version, kind, body):
    return msgpack.packb([version, kind, body])


@pytest.mark.parametrize("frames, match", [
    ([], "empty"),
    ([b"\xc1" + os.urandom(63)], "not msgpack"),  # 0xc1 is never valid msgpack
    ([b"\x93\x01"], "not msgpack"),  # truncated array
    ([head(V, 99, [])], "unknown message kind"),
    ([head(V, "TASKS", [])], "unknown message kind"),
    ([msgpack.packb({"a": 1})], "header is not"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 2]]]), b"only one"], "counts 2 frames"),
    ([head(V, int(Kind.TASKS), [[[1, b"", 0, 0]]])], "fn_key"),
    ([head(V, int(Kind.TASKS), [[[-1, b"k", 0, 0]]])], "bad task id"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 2, 0]]])], "fn_frames"),
    ([head(V, int(Kind.RESULTS), [[[1, 42, 0, 0.0]]])], "status"),
    ([head(V, int(Kind.RESULTS), [[[1, 0, 0, "slow"]]])], "duration"),
    ([head(V, int(Kind.RESULTS), [[[1, 0, 3, 0.0]]]), b"x"], "counts 3 frames"),
    # Values that stopped the scheduler or let one key claim the cluster (issue: a
    # NaN duration poisoned the run-time average; 10**9 slots took every task).
    ([head(V, int(Kind.RESULTS), [[[1, 0, 0, float("nan")]]])], "not a finite number"),
    ([head(V, int(Kind.RESULTS), [[[1, 0, 0, float("inf")]]])], "not a finite number"),
    ([head(V, int(Kind.RESULTS), [[[1, 0, 0, -float("inf")]]])], "not a finite number"),
    ([head(V, int(Kind.HELLO), [{"slots": 10**9}])], "out of range"),
    ([head(V, int(Kind.HELLO), [{"retries": 10**6}])], "out of range"),
    ([head(V, int(Kind.HELLO), [{"heartbeat": float("inf")}])], "HELLO heartbeat"),
    ([head(V, int(Kind.HELLO), [{"heartbeat": float("nan")}])], "HELLO heartbeat"),
    ([head(V, int(Kind.HELLO), [{"name": "x" * 256}])], "HELLO name"),
    ([head(V, int(Kind.HELLO), [{"name": b"\xff\xfe"}])], "HELLO name"),
    ([head(V, int(Kind.HEARTBEAT), [1])], "empty"),
    ([head(V, int(Kind.HELLO), ["not a map"])], "info-map"),
    ([head(V, int(Kind.HELLO), [{"slots": "2"}])], "HELLO slots"),
    ([head(V, int(Kind.HELLO), [{"slots": 0}])], "out of range"),
    ([head(V, int(Kind.HELLO), [{"retries": -1}])], "out of range"),
    ([head(V, int(Kind.HELLO), [{"heartbeat": 0}])], "HELLO heartbeat"),
    ([head(V, int(Kind.HELLO), [{"pid": "1"}])], "HELLO pid"),
    ([head(V, int(Kind.HELLO), [{"supervisor": "text, not bytes"}])], "HELLO supervisor"),
    ([head(V, int(Kind.HELLO), [{"running": {"w": 1}}])], "HELLO running is not a list"),
    ([head(V, int(Kind.HELLO), [{"running": [[b"w", 1]] * 1025}])], "at most 1024"),
    ([head(V, int(Kind.HELLO), [{"running": [["w", 1]]}])], "bad entry"),
    ([head(V, int(Kind.HELLO), [{"running": [[b"w", -1]]}])], "bad entry"),
    ([head(V, int(Kind.HELLO), [{"running": [[b"w", 1.5]]}])], "bad entry"),
    ([head(V, int(Kind.HELLO), [{"running": [[b"w"]]}])], "bad entry"),
    ([head(V, int(Kind.WELCOME), [{"session": "s", "heartbeat": 1.0}])], "WELCOME needs"),
    ([head(V, int(Kind.WELCOME), [{"session": "s", "heartbeat": 1.0, "liveness": 0}])],
     "WELCOME needs"),
    ([head(V, int(Kind.LOST), [{"worker": "w1", "how": "exit code 1"}])], "LOST worker"),
    ([head(V, int(Kind.LOST), [{"worker": b"w1"}])], "LOST needs"),
    ([head(V, int(Kind.LOST), [{"worker": b"w1", "how": "?", "running": "7"}])], "LOST running"),
    ([head(V, int(Kind.BYE), [b"bytes"])], "reason"),
    ([head(V, int(Kind.CANCEL), [["x"]])], "task id"),
    ([head(V, int(Kind.STATUS), []), b"extra"], "unexpected frames"),
    # Time limits and stops (Executor.options, Executor.stop).
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, float("nan"), None, None, 0]]])],
     "timeout is not a number of seconds"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, 0, None, None, 0]]])], "timeout"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, 1e9, None, None, 0]]])], "timeout"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, 5.0, -1.0, None, 0]]])], "grace"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, 5.0, None, 10**6, 0]]])], "retries"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, 5.0]]])], "bad task limits"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], [[1, None, None, None, 10**9]]])],
     "priority"),
    ([head(V, int(Kind.TASKS), [[[1, b"k", 0, 0]], {"1": 5}])], "limits are not a list"),
    ([head(V, int(Kind.STOP), [[1, 2]])], "STOP body"),
    ([head(V, int(Kind.STOP), [["x"], 1.0])], "task id"),
    ([head(V, int(Kind.STOP), [[1], float("inf")])], "grace"),
    ([head(V, int(Kind.INTERRUPT), [b"w", 1])], "INTERRUPT body"),
    ([head(V, int(Kind.INTERRUPT), ["w", 1, True])], "INTERRUPT body"),
    ([head(V, int(Kind.INTERRUPT), [b"w", -1, False])], "task id"),
])
def test_malformed_messages_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(frames)


def test_task_limits_travel_with_a_batch_and_only_when_given():
    from farpool.task_control import TaskOptions

    class T:
        def __init__(self, task_id, options):
            self.task_id, self.fn_key, self.fn_blob, self.frames = task_id, b"k", b"f", []
            self.options = options

    tasks = [T(1, None), T(2, TaskOptions(timeout=5.0, retries=1))]
    msg = protocol.decode(protocol.encode_tasks(tasks, lambda key: False, with_options=True))
    assert msg.body[1] == {2: protocol.TaskLimits(2, 5.0, None, 1, 0)}
    plain = protocol.decode(protocol.encode_tasks(tasks, lambda key: False))
    assert len(plain.body) == 1  # what a scheduler sends its workers: no limits


def test_hello_welcome_and_lost_decode_to_typed_records():
    # What each receiver reads: fields with their types checked once, here, and the
    # defaults a peer may leave out; the whole map stays for versions and STATUS.
    info = {"role": "client", "pid": 12, "hello": 3, "heartbeat": 2, "retries": 1, "x": "kept"}
    hello = protocol.decode(protocol.encode(Kind.HELLO, [info])).body[0]
    assert hello == protocol.Hello(role="client", pid=12, slots=1, heartbeat=2.0, retries=1,
                                   seq=3, supervisor=b"", name=None, info=info)
    bare = protocol.decode(protocol.encode(Kind.HELLO, [{}])).body[0]
    assert (bare.role, bare.pid, bare.slots, bare.heartbeat, bare.retries, bare.seq) == (
        None, None, 1, None, 0, None)  # an unknown role is the scheduler's to refuse
    welcome = protocol.decode(protocol.encode(Kind.WELCOME, [
        {"session": "ab", "heartbeat": 1, "liveness": 3, "hello": 3}])).body[0]
    assert (welcome.session, welcome.heartbeat, welcome.liveness, welcome.seq) == ("ab", 1.0, 3, 3)
    sent = protocol.Lost(b"w1", "signal SIGKILL", 7, None)
    assert protocol.decode(protocol.encode(Kind.LOST, [sent._asdict()])).body[0] == sent


def test_wrong_protocol_version_is_a_version_mismatch():
    with pytest.raises(VersionMismatch, match="protocol version 999"):
        protocol.decode([head(999, int(Kind.HELLO), [{}])])


def test_version_conflicts_name_what_differs():
    ours = protocol.version_info()
    assert protocol.version_conflicts(ours, dict(ours)) == []
    patch = dict(ours, farpool=ours["farpool"] + ".post1")  # same major.minor: compatible
    assert protocol.version_conflicts(ours, patch) == []
    theirs = dict(ours, python="2.7", cloudpickle="0.1.0")
    problems = protocol.version_conflicts(ours, theirs)
    assert any(f"python 2.7 on the connecting side, {ours['python']} on the scheduler" in p
               for p in problems)
    assert any("cloudpickle 0.1.0 on the connecting side" in p for p in problems)


def test_send_routed_delivers_one_frame_and_many_frames_whole():
    # A ROUTER's send to one peer: the peer gets exactly the frames given, a small
    # one-frame header alone, and a header with a large (uncopied) payload frame.
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.router_mandatory = True
    router.rcvtimeo = 5000
    router.bind("inproc://protocol-send-routed")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.identity = b"peer"
    dealer.connect("inproc://protocol-send-routed")
    dealer.rcvtimeo = 5000
    try:
        dealer.send(b"hi")
        assert router.recv_multipart() == [b"peer", b"hi"]
        header = protocol.encode(Kind.TASKS, [[[1, b"-", 0, 0]]])
        protocol.send_routed(router, b"peer", header)
        msg = protocol.decode(protocol.recv_frames(dealer))
        assert msg.body[0] == [(1, b"-", 0, 0)] and msg.frames == []
        big = os.urandom(100_000)
        protocol.send_routed(router, b"peer", protocol.encode(Kind.TASKS, [[[2, b"k", 0, 2]]],
                                                              [b"small", big]))
        msg = protocol.decode(protocol.recv_frames(dealer))
        assert [bytes(f) for f in msg.frames] == [b"small", big]
        with pytest.raises(zmq.ZMQError):  # an unknown peer is an error, not a silent drop
            protocol.send_routed(router, b"nobody", header)
    finally:
        dealer.close()
        router.close()
        ctx.term()


# -- BYE reasons and peer roles: enums on a wire of plain strings ----------------------
def test_a_bye_reason_and_its_detail_round_trip_through_the_wire():
    text = protocol.bye_text(protocol.ByeReason.INITIALIZER_FAILED, "Traceback: boom")
    body = protocol.decode(protocol.encode(protocol.Kind.BYE, [text])).body
    assert protocol.bye_reason(body[0]) is protocol.ByeReason.INITIALIZER_FAILED
    assert body[0].split(":\n", 1)[1] == "Traceback: boom"


def test_a_bye_of_free_text_steers_nothing():
    assert protocol.bye_reason("asked to stop") is None
    assert protocol.bye_reason("retiring soon") is None  # only the exact word steers
    assert protocol.bye_reason("retiring") is protocol.ByeReason.RETIRING


def test_roles_and_reasons_travel_as_the_plain_words_older_peers_send():
    assert msgpack.packb([protocol.PeerRole.WORKER]) == msgpack.packb(["worker"])
    assert msgpack.packb([protocol.ByeReason.RECONNECT]) == msgpack.packb(["reconnect"])
    assert f"{protocol.PeerRole.CLIENT}s" == "clients"  # counters and logs read as before
