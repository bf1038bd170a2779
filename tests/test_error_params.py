"""Library errors name the library parameter at fault (``InputError.param``), never a command-line flag.

The command line adds the flag from ``exc.param``; the library's own texts (error messages, notes,
warnings: every string literal that is not a docstring) must not spell ``--flag``. The loaders
(``basins/files/loading``) are checked by their own tests.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from basins import InputError, Problem
from basins.analyses.evidence import evidence
from basins.analyses.features import feature_analysis
from basins.analyses.hessian import hessian_eigenvalues
from basins.analyses.landscape import landscape_slice
from basins.analyses.llc import llc
from basins.analyses.nullity import nullity
from basins.analyses.spectrum import hessian_spectrum
from basins.engine.memory import memory_budget

ROOT = Path(__file__).resolve().parent.parent / "basins"
SKIP = ("files/loading/",)
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(SKIP):
            yield rel, ast.parse(path.read_text(encoding="utf-8"))


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that stand alone as statements (docstrings, attribute docs)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _text(node: ast.AST) -> str:
    """The literal text of a message expression: constants, f-string parts, ``+`` and ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _text(node.left) + _text(node.right)
    if isinstance(node, ast.IfExp):
        return _text(node.body) + _text(node.orelse)
    return ""


def test_no_library_text_names_a_flag() -> None:
    found = []
    for rel, tree in _sources():
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and FLAG.search(node.value):
                found.append(f"basins/{rel}:{node.lineno}: {node.value.strip()[:80]!r}")
    assert not found, "library texts name command-line flags (name the parameter instead):\n" + "\n".join(found)


def test_the_scan_sees_messages() -> None:
    """The scan above finds a flag in an f-string message and skips docstrings."""
    tree = ast.parse('def f(x):\n    """Use ``--flag``."""\n    raise InputError(f"x={x}: use --memory")\n')
    docs = _docstrings(tree)
    hits = [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and FLAG.search(n.value)]
    assert hits == [": use --memory"]


def test_a_named_param_is_named_in_its_message() -> None:
    """``raise InputError("...", param="k")``: the message says ``k`` (the caller's name for it)."""
    bad = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Error"):
                for kw in node.keywords:
                    if kw.arg == "param" and isinstance(kw.value, ast.Constant) and node.args \
                            and str(kw.value.value) not in _text(node.args[0]):
                        bad.append(f"basins/{rel}:{node.lineno}: param={kw.value.value!r}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------- .param on a tiny problem
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def problem() -> Problem:
    torch.manual_seed(0)
    x, y = _data()
    return Problem(nn.Linear(3, 2).double(), x, y, "mse", hvp_route="rev-rev")


def _problem_with(**kw: Any) -> Callable[[], Problem]:
    def build() -> Problem:
        x, y = _data()
        return Problem(nn.Linear(3, 2).double(), x, y, kw.pop("loss", "mse"), **kw)
    return build


CALLS: list[tuple[str, Callable[[Problem], Any]]] = [
    ("num_probes", lambda p: nullity(p, num_probes=1)),
    ("method", lambda p: nullity(p, method="svd")),
    ("rtols", lambda p: nullity(p, rtols=(-1.0,))),
    ("k", lambda p: hessian_eigenvalues(p, k=0)),
    ("which", lambda p: hessian_eigenvalues(p, which="middle")),
    ("max_hvps", lambda p: hessian_eigenvalues(p, k=3, max_hvps=2)),  # Lanczos' max_matvecs, named as passed
    ("num_points", lambda p: landscape_slice(p, num_points=1)),
    ("directions", lambda p: landscape_slice(p, directions="sideways")),
    ("num_chains", lambda p: llc(p, num_chains=0)),
    ("minibatch", lambda p: llc(p, minibatch=0)),
    ("num_probes", lambda p: hessian_spectrum(p, num_probes=0)),
    ("curvature", lambda p: evidence(p, curvature="fisher")),
    ("top_vectors", lambda p: feature_analysis(p, top_vectors=-1)),
    ("memory_bytes", lambda p: memory_budget(-1)),
    ("hvp_route", lambda p: _problem_with(hvp_route="fast")()),
    ("batch_size", lambda p: _problem_with(batch_size=0)()),
    ("params", lambda p: _problem_with(params=["no.such.*"])()),
    ("loss", lambda p: _problem_with(loss="hinge")()),
    ("dtype", lambda p: _problem_with(dtype="float16")()),
    ("device", lambda p: _problem_with(device="not-a-device")()),
]


@pytest.mark.parametrize(("param", "call"), CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(CALLS)])
def test_errors_carry_the_parameter(problem: Problem, param: str, call: Callable[[Problem], Any]) -> None:
    with pytest.raises(InputError) as exc:
        call(problem)
    msg = str(exc.value)
    assert exc.value.param == param, msg
    assert param in msg and not FLAG.search(msg), msg
    assert param != "max_hvps" or "max_matvecs" not in msg, msg


def test_a_data_error_blames_no_parameter() -> None:
    """Bad data is not a bad option: no ``param``, so no flag is put in front of the message."""
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="examples but targets have") as exc:
        Problem(nn.Linear(3, 2).double(), x, torch.randn(5, 2, dtype=torch.float64), "mse")
    assert exc.value.param is None
