"""``python -m pipeline``: see :mod:`pipeline.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while starting: nothing has been done yet
    print("interrupted", file=sys.stderr)
    exec("pass")  # see pipeline.cli.main: otherwise CPython may end the process by SIGINT instead
    raise SystemExit(130) from None

raise SystemExit(main())
