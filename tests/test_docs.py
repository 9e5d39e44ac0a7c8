"""The documentation's code runs, its printed output is what it shows, and its generated files are
current.

Each page under `docs/` is a test: its fenced `python` blocks run in order, in one namespace. A
block followed by a fenced block titled "Output" (```` ```text title="Output" ````) must print
that text (compared as doctest does, with `...` as a wildcard and whitespace normalised). A block
preceded by an HTML comment `<!-- skip: reason -->` is not run; there should be few of those.
"""

import contextlib
import dataclasses
import doctest
import io
import pathlib
import re
import sys
import textwrap
import types

import jax
import pytest


DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(
    p for p in DOCS.rglob("*.md") if "generated" not in p.parts and "```python" in p.read_text()
)

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_SKIP = re.compile(r"<!--\s*skip\b[^>]*-->\s*$")


@dataclasses.dataclass
class Block:
    line: int
    code: str
    skip: bool = False
    expected_output: str | None = None


def blocks_of(page: pathlib.Path) -> list[Block]:
    """The runnable python blocks of a page, each with the output it is documented to print."""
    text = page.read_text()
    blocks: list[Block] = []
    previous_end = 0
    for fence in _FENCE.finditer(text):
        before = text[previous_end : fence.start()]
        line = text.count("\n", 0, fence.start()) + 1
        body = textwrap.dedent(fence["body"])
        if fence["lang"] == "python":
            skip = bool(_SKIP.search(before.rstrip("\n").rsplit("\n", 1)[-1]))
            blocks.append(Block(line, body, skip))
        elif 'title="Output"' in fence["info"]:
            previous = blocks[-1] if blocks else None
            if (
                previous is None
                or previous.skip
                or previous.expected_output is not None
                or before.strip()
            ):
                raise AssertionError(
                    f"{page.name}:{line}: an Output block must directly follow a run python block"
                )
            previous.expected_output = body
        previous_end = fence.end()
    return [b for b in blocks if not b.skip]


@contextlib.contextmanager
def _user_defaults():
    # The suite's conftest turns on strict dtype promotion and rank-promotion errors to keep the
    # library honest. The docs show what users type under JAX's defaults (optax, for one, mixes
    # Python floats with int32 step counts, which strict promotion refuses), so each page runs
    # under those defaults. Warnings stay errors: a page that shows a warning catches it itself.
    # Pages show what a CPU user sees (full-precision float32 matmuls, interpret-mode kernels),
    # so they run on the CPU device whatever the machine.
    with (
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
        jax.default_device(jax.devices("cpu")[0]),
    ):
        yield


def _check_output(page: pathlib.Path, block: Block, got: str) -> None:
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    want = block.expected_output
    assert want is not None
    if not checker.check_output(want, got, flags):
        raise AssertionError(
            f"{page.relative_to(DOCS)}:{block.line}: the block's output differs from the page.\n"
            f"--- page\n{want}--- printed\n{got}"
        )


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_code_runs_and_prints_what_the_page_shows(page, tmp_path, monkeypatch):
    blocks = blocks_of(page)
    monkeypatch.chdir(tmp_path)  # pages may write files (checkpoints); keep them out of the repo
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look classes up here
    namespace = module.__dict__
    with _user_defaults():
        for block in blocks:
            code = compile(block.code, f"{page.relative_to(DOCS)}:{block.line}", "exec")
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(code, namespace)
            if block.expected_output is not None:
                _check_output(page, block, stdout.getvalue())


def test_every_skipped_block_says_why():
    for page in PAGES:
        for comment in re.findall(r"<!--\s*skip\b([^>]*)-->", page.read_text()):
            assert comment.strip(": ").strip(), f"{page.name}: `<!-- skip -->` needs a reason"


def test_generated_files_are_current():
    """`docs/generated/` is what `docs/scripts/gen_jaxprs.py` writes now.

    Jaxpr text and compiled memory depend on the JAX version, so those files are compared only
    under the version that wrote them (recorded in their first line); the rest always.
    """
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        import gen_jaxprs
    finally:
        sys.path.pop(0)
    with _user_defaults():
        generated = gen_jaxprs.generate(
            only_version_independent=jax.__version__ != gen_jaxprs.recorded_version()
        )
    assert generated, "the generator produced nothing"
    stale = [
        name
        for name, text in generated.items()
        if not (DOCS / "generated" / name).exists()
        or (DOCS / "generated" / name).read_text() != text
    ]
    assert not stale, (
        f"stale: {stale}; run `python docs/scripts/gen_jaxprs.py` (jax {jax.__version__})"
    )
