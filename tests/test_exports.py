"""The public surface: every public name of the submodules is re-exported by ``aem``."""

from __future__ import annotations

import importlib

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
