"""The public surface: every public name of the submodules is re-exported by ``aem``."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

import aem

MODULES = ["aem.engine", "aem.sources", "aem.capsules", "aem.vmtable"]


@pytest.mark.parametrize("name", MODULES)
def test_all_public_names_are_reexported(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(aem, n)]
    assert not missing, f"{name} exports {missing} but aem does not"


def test_spec_names_exist() -> None:
    for n in ["register", "unregister", "control", "stats", "set_error_handler", "run", "start", "stop",
              "keepalive", "Event", "Engine", "Timer", "Readable", "Writable", "Accept", "Read", "Close",
              "Signal", "ChildExit", "FileChange", "UserEvent", "MemoryPressure", "Source",
              "EVF_ONESHOT", "EVF_FORK", "EVF_CAPSULE", "EVF_NOCLDWAIT", "EVF_KEEPALIVE",
              "EVJOBPRIO", "EVJOBSTOP", "EVJOBSTART", "EVJOBSHTDN", "EVTBLINIT"]:
        assert hasattr(aem, n), n
    # AEM's numbering of job operations
    assert (aem.EVJOBPRIO, aem.EVTBLINIT, aem.EVJOBSHTDN, aem.EVJOBSTART, aem.EVJOBSTOP) == (1, 2, 3, 4, 5)


def test_public_callables_have_docstrings() -> None:
    undocumented = [n for n in dir(aem) if not n.startswith("_") and callable(getattr(aem, n))
                    and not (getattr(aem, n).__doc__ or "").strip()]
    assert not undocumented


def test_no_stray_public_names() -> None:
    """Every public name of ``aem`` is one of its explicit re-exports (or a submodule, or
    ``__version__``): no ``annotations`` from a ``__future__`` import, no helper leaking."""
    tree = ast.parse(Path(aem.__file__).read_text())
    reexported = {alias.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  for alias in node.names if alias.asname}
    public = {n for n in dir(aem) if not n.startswith("_")
              and not isinstance(getattr(aem, n), types.ModuleType)}
    assert "annotations" not in public
    assert public <= reexported, f"public by accident: {sorted(public - reexported)}"
