"""The one exception type for problems caused by user input (files, arguments, configs).

Entry scripts catch it, print its message as one line on stderr and exit with code 2; anything
else is a bug and keeps its traceback.
"""


class ArcFaceError(Exception):
    """A user-facing error whose message names the offending file, record or argument."""
