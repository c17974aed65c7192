"""The one exception type lorakit raises for bad input, so callers can catch it and CLIs can print it cleanly."""


class LorakitError(ValueError):
    """A problem with what the user asked for: the message says what was received, what is allowed, what to do."""
