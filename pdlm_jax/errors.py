"""The one exception type users see for bad input, bad files and bad settings."""


class PDLMError(Exception):
    """Raised for every user-facing error; the message names the file/argument and the fix."""


class TooLarge(PDLMError):
    """An input over a size limit (image pixels, request body): HTTP 413 in pdlm-serve."""
