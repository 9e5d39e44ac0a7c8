"""The README's opening snippet runs as pasted.

`tests/test_docs.py` runs the pages under `docs/`; the README is not one of them, so its first
`python` block is run here, in a namespace of its own (it must import and define everything it
uses) and under JAX's default dtype and rank promotion (what users have; the suite's conftest
makes both strict). Warnings stay errors.
"""

import contextlib
import io
import pathlib
import re

import jax


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no ```python block"
    return match[1]


def test_readme_opening_snippet_runs_on_its_own_and_prints_the_saving(tmp_path, monkeypatch):
    code = compile(first_python_block(README.read_text()), "README.md", "exec")
    monkeypatch.chdir(tmp_path)
    stdout = io.StringIO()
    namespace: dict = {"__name__": "readme"}
    with (
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
        contextlib.redirect_stdout(stdout),
    ):
        exec(code, namespace)
    assert "saved" in stdout.getvalue(), stdout.getvalue()
    assert jax.numpy.isfinite(namespace["value"])
