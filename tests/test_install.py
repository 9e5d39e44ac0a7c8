"""Installing tietransform leaves another distribution's top-level `kernels` alone: the kernels
ship as `tietransform.kernels` (the repository's `kernels/` folder, reached through the git symlink
`tietransform/kernels -> ../kernels`), in-tree, in editable installs, in wheels and under
`PYTHONPATH=.` alike."""

import ast
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_holds_the_kernels_under_tietransform_and_no_top_level_kernels(tmp_path):
    wheel_builder = pytest.importorskip(
        "hatchling.builders.wheel", reason="hatchling (the build backend) is not installed"
    )
    builder = wheel_builder.WheelBuilder(str(ROOT))
    (wheel,) = builder.build(directory=str(tmp_path), versions=["standard"])
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.startswith("tietransform-")}
    assert top_level == {"tietransform"}
    assert "tietransform/kernels/__init__.py" in names
    assert "tietransform/kernels/ffn/__init__.py" in names


def test_tietransform_kernels_imports_beside_another_top_level_kernels(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("OTHER_DISTRIBUTION = True\n")
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import kernels
        import tietransform.kernels
        from tietransform.kernels import ffn, ffn_support
        assert kernels.OTHER_DISTRIBUTION
        assert tietransform.kernels is not kernels
        assert "kernels.ffn" not in sys.modules, "tietransform imported the top-level kernels"
        print(tietransform.kernels.__name__, ffn.__module__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tietransform.kernels", "tietransform.kernels.ffn._api"]


def test_kernels_never_import_tietransform():
    """`tietransform` imports its kernels lazily; the kernels import nothing of `tietransform`
    (relative imports only), so neither import order can be circular."""
    importers = []
    for source in sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] in ("tietransform", "kernels") for n in names):
                importers.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert importers == []
