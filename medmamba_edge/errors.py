"""The one base class for errors a user can act on (bad input, a missing part).

The CLI prints such an error as one line and exits non-zero; anything else is a bug and keeps its
traceback. Torch-free, so the runtime and the plugin tools share it.
"""


class UserError(Exception):
    """Bad input or a missing part; the message names the file and what is wrong."""
