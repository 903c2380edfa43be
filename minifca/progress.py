"""Progress bars for long runs: tqdm on stderr, so stdout stays the result."""
from __future__ import annotations

import sys


def progress(total, desc="", enabled=None, unit="text"):
    """A tqdm bar counting `total` items. enabled: True always, False never, None only when stderr is a
    terminal (so logs and pipes get no bar). Use as a context manager and call .update(n)."""
    from tqdm.auto import tqdm
    on = sys.stderr.isatty() if enabled is None else bool(enabled)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not on, file=sys.stderr)
