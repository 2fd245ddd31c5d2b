"""The one exception type for bad input.

Every user-facing mistake (a missing file, an impossible setting) raises :class:`VistokError`
with one sentence that names the problem and the fix. The command line and ``train.py`` turn
it into that sentence on stderr and exit status 2, without a traceback.
"""


class VistokError(Exception):
    """Bad input or configuration; ``str(error)`` is one sentence naming the problem and the fix."""
