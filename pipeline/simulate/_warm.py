"""Build one slide's sprite and noise banks in the process local render workers are forked from.

Imported by that server as it starts (``run._WORKER_PRELOAD``): every worker forked from it then starts
with the banks in memory, shared page by page, instead of building its own before its first chunk.
"""

from __future__ import annotations

import os

from .run import WARM_BANKS_ENV


def _warm_from_environment() -> None:
    # Taken out of the environment: neither the server nor the workers forked from it pass it on.
    words = os.environ.pop(WARM_BANKS_ENV, "").split()
    if len(words) != 2:
        return
    from .render import warm_banks

    try:
        warm_banks(int(words[0]), float(words[1]))
    except Exception:  # only saves the workers time: they build whatever is missing themselves
        pass


_warm_from_environment()
