"""The public API as a type checker sees it: submit is typed with ParamSpec, as
typeshed types the stdlib's, so a wrong argument is flagged before anything runs."""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)

SNIPPET = textwrap.dedent('''
    import farpool

    def square(x: int) -> int:
        return x * x

    ex = farpool.Executor("threads")
    ok: int = ex.submit(square, 3).result()
    ex.submit(square, "x")
    ex.submit(square, 1, 2)
    bad: str = ex.submit(square, 3).result()
    pool = farpool.ProcessPoolExecutor()
    pool.submit(square, "y")
''')


def test_mypy_flags_wrong_arguments_to_submit(tmp_path):
    api = pytest.importorskip("mypy.api")
    path = tmp_path / "snippet.py"
    path.write_text(SNIPPET)
    out, err, status = api.run([str(path), "--cache-dir", str(tmp_path / "cache"),
                                "--follow-imports", "silent", "--no-error-summary"])
    lines = [line for line in out.splitlines() if "snippet.py" in line]
    assert status == 1, out + err
    flagged = sorted(int(line.split(":")[1]) for line in lines)
    assert flagged == [9, 10, 11, 13], out  # the three wrong submits and the wrong result type
