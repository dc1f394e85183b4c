"""``python -m gateway`` is the ``sandman`` command."""

import sys

from gateway.cli import main

sys.exit(main())
