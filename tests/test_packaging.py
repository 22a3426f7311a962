"""The installed layout: nothing at the repository root shadows a PyPI distribution.

``python -m pytest``, ``python -c`` and notebooks started in a checkout put the repository
root first on ``sys.path``. transformers (>= 5.25) probes for the PyPI package ``kernels``
at import; a regular package folder named ``kernels`` at the root would answer that probe
and break every transformers model import. These run in a fresh interpreter whose working
directory is the root, exactly as a user's ``python -c`` would.
"""
import pathlib
import subprocess
import tempfile
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_no_root_folder_is_a_regular_package():
    # any top-level folder with an __init__.py would be importable under its own name
    shadowing = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert shadowing == ["moebal"], f"top-level folders importable as packages: {shadowing}"


def test_transformers_moe_models_import_next_to_moebal_from_repo_root():
    pytest.importorskip("transformers")
    out = _run_at_root(
        "import sys; assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd()\n"
        "import moebal\n"
        "import transformers.models.mixtral.modeling_mixtral\n"
        "import transformers.models.qwen3_moe.modeling_qwen3_moe\n"
        "import transformers.models.deepseek_v3.modeling_deepseek_v3\n"
        "from transformers.utils.import_utils import _is_package_available\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('kernels-origin', spec.origin if spec else None)\n"
        "print('kernels-available', _is_package_available('kernels'))\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # whatever `kernels` resolves to from the root, it is never this repository's folder
    origin = out.stdout.split("kernels-origin ", 1)[1].splitlines()[0]
    assert not origin.startswith(str(ROOT / "kernels")), origin


def test_kernels_import_as_moebal_kernels_from_repo_root():
    pytest.importorskip("triton")
    out = _run_at_root(
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import moebal.triton_ops as ops\n"
        "import moebal.kernels.dispatch as d\n"
        "print(ops._kernels.__name__, d.dispatch_rows.__module__)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["moebal.kernels.api", "moebal.kernels.dispatch"]


def test_importing_moebal_does_not_import_triton():
    # the kernel tests set TRITON_INTERPRET=1 before triton is first imported; an import of
    # torch._dynamo (torch.compiler.disable at module level, say) imports triton too early
    code = "import sys, moebal, moebal.hf; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())
