"""``python -m orthotorch``: the ``orthotorch`` command."""

import sys

from orthotorch.apps.cli import main

sys.exit(main())
