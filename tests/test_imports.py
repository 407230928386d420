"""What importing a module loads: the broker must never be able to unpickle."""

import subprocess
import sys


def _loaded_after(statement: str, module: str) -> bool:
    code = f"import sys; {statement}; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip() == "True"


def test_the_scheduler_does_not_load_cloudpickle():
    # It routes function blobs by key (fncache.SentFunctions) and never unpickles them.
    assert not _loaded_after("import farpool.scheduler", "cloudpickle")
    # Nor when it compares a peer's versions with its own.
    assert not _loaded_after("import farpool.scheduler, farpool.protocol as p; p.version_info()",
                             "cloudpickle")


def test_the_check_itself_sees_a_module_that_loads_it():
    assert _loaded_after("import farpool.serialize", "cloudpickle")
