"""The one error type users see: its message says what to do next."""


class LatentKVError(Exception):
    """A user-facing mistake (bad input, unsupported model, impossible setting).

    The CLI prints the message without a traceback, so the message must name the fix.
    """
