"""The one exception type ptqlab raises for bad input: its message names the problem and the fix.

The CLI prints it as one line (no traceback) and exits with status 2.
"""


class PtqlabError(Exception):
    """A problem the user can fix; the message says how."""
