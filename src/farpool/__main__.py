"""``python -m farpool``: the same as the ``farpool`` command."""

import sys

from .cli import main

sys.exit(main())
