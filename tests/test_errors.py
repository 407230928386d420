"""One InitializerFailed for every backend, in the documented tree."""

import pickle
from concurrent.futures.process import BrokenProcessPool

import farpool
from farpool.backends import engine, remote
from farpool.errors import FarpoolError, InitializerFailed, ProcessPoolBroken


def test_one_initializer_failed_type_everywhere():
    assert farpool.InitializerFailed is InitializerFailed
    assert engine.InitializerFailed is InitializerFailed
    assert remote.InitializerFailed is InitializerFailed
    assert issubclass(InitializerFailed, ProcessPoolBroken)
    assert issubclass(InitializerFailed, FarpoolError)
    assert issubclass(InitializerFailed, BrokenProcessPool)


def test_initializer_failed_carries_the_worker_error_through_pickle():
    error = pickle.loads(pickle.dumps(InitializerFailed("ValueError('boom')\nTraceback...")))
    assert type(error) is InitializerFailed
    assert error.tb.startswith("ValueError('boom')")
    assert "initializer failed" in str(error) and "boom" in str(error)
