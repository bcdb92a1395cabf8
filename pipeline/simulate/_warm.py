"""Build one slide's sprite and noise banks in the process local render workers are forked from.

Imported by that server as it starts (``run._WORKER_PRELOAD``): every worker forked from it then starts
with the banks in memory, shared page by page, instead of building its own before its first chunk.
"""

from __future__ import annotations

import os

#: ``"<seed> <mpp>"`` of the slide whose banks the server builds (set only while it starts).
WARM_BANKS_ENV = "PIPELINE_SIMULATE_WARM_BANKS"


def _warm_from_environment() -> None:
    words = os.environ.get(WARM_BANKS_ENV, "").split()
    if len(words) != 2:
        return
    from .render import warm_banks

    warm_banks(int(words[0]), float(words[1]))


_warm_from_environment()
