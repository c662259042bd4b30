"""``python -m dispatch``: the same as the ``dispatch`` command."""

from .cli import main

raise SystemExit(main())
