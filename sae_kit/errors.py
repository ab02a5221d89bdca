"""The base class of sae-kit's user-facing errors: one line that says what is wrong and how to fix it."""


class SaeKitError(ValueError):
    """Bad input or state that the user can fix; the CLI prints the message alone, without a traceback."""
