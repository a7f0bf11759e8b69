"""The one exception type users of the converter need to catch."""


class ConversionError(ValueError):
    """Bad input or arguments: reported to CLI users as a one-line message with exit status 2."""
