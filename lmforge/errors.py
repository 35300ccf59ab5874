"""The one exception type users see.

Anything a user can get wrong (a path, a config key, a corrupt file) raises ``LmforgeError``
with a one-line message that says what is wrong and how to fix it. The CLI prints it and exits
with status 2; ``--debug`` shows the traceback instead.
"""


class LmforgeError(Exception):
    """A mistake in the user's input, described in one line with the way to fix it."""
