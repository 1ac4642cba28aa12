"""Loaded at start by every Python process the tests start (their PYTHONPATH names this folder).

With GATEWAY_TEST_NETWORK_GUARD set, it installs the tests' network guard (network_guard.py) before
anything else runs, then runs the sitecustomize this one hides, if there is one. Never on a
deployed machine: only tests/conftest.py puts this folder on a PYTHONPATH.
"""

import os
import sys

if os.environ.get("GATEWAY_TEST_NETWORK_GUARD"):
    import network_guard

    network_guard.install()


def _run_the_hidden_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    others = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_run_the_hidden_sitecustomize()
