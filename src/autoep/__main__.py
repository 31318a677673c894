"""``python -m autoep`` is the ``autoep`` command."""

import sys

from autoep.cli.main import main

sys.exit(main())
