"""``python -m dm_agent``: the same as the ``dm-agent`` command."""

import sys

from .cli import main

sys.exit(main())
