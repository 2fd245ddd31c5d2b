"""``python -m vistok ...`` is the ``vistok`` command."""
import sys

from vistok.cli import main

sys.exit(main())
