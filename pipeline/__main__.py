"""``python -m pipeline``: see :mod:`pipeline.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while starting: nothing has been done yet
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
