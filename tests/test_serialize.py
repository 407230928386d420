"""Pickling for the wire: out-of-band buffers, and chunked large buffers for the network."""

from __future__ import annotations

import pickle

import pytest

from farpool import serialize


def test_large_buffers_travel_out_of_band_whole_by_default():
    np = pytest.importorskip("numpy")
    arr = np.arange(3_000_000, dtype=np.float64)  # 24 MB
    frames = serialize.dumps(arr)
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == arr.nbytes
    assert (serialize.loads(frames) == arr).all()


def test_chunked_round_trip_keeps_every_buffer():
    np = pytest.importorskip("numpy")
    big = np.random.rand(3_000_000)  # 24 MB: chunked
    mid = np.arange(200_000)  # 1.6 MB: out of band, whole
    blob = b"x" * (serialize.CHUNK_MIN_BYTES + 123)
    obj = {"big": big, "mid": mid, "blob": pickle.PickleBuffer(blob), "small": [1, 2]}
    frames = serialize.dumps(obj, chunked=True)
    assert bytes(frames[0][:1]) == b"L"
    expected_chunks = -(-big.nbytes // serialize.CHUNK_BYTES) + 1 + -(-len(blob) // serialize.CHUNK_BYTES)
    assert len(frames) == 2 + expected_chunks
    back = serialize.loads([bytes(f) for f in frames])
    assert (back["big"] == big).all() and (back["mid"] == mid).all()
    assert bytes(back["blob"]) == blob and back["small"] == [1, 2]


def test_a_lying_chunk_layout_is_an_error_not_garbage():
    np = pytest.importorskip("numpy")
    frames = serialize.dumps(np.zeros(2_000_000), chunked=True)
    with pytest.raises(ValueError, match="chunk layout"):
        serialize.loads(frames[:-1])  # one chunk missing
