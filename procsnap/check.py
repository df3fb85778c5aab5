"""`procsnap check`: whether this kernel has every feature procsnap uses.

The probes themselves are in kernel/probes.py, below both this verb and
restorer/verify.py, which runs them too.
"""

from __future__ import annotations

from .kernel.probes import Result, run_checks


def check() -> list[Result]:
    """One Result per kernel feature, each probed with the real call."""
    return run_checks()
