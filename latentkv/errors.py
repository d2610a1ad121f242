"""The one error type users see: its message says what to do next."""


class LatentKVError(Exception):
    """A user-facing mistake (bad input, unsupported model, impossible setting).

    The CLI prints the message without a traceback, so the message must name the fix.
    """


def installed_exceptions(candidates: tuple[tuple[str, str], ...]) -> list[type[BaseException]]:
    """Exception classes (module, name) of whichever optional HTTP clients are installed.

    huggingface_hub's HTTP client changed over versions (requests, httpx, httpx2), so code that
    catches network failures asks for each and keeps what exists.
    """
    import importlib

    found: list[type[BaseException]] = []
    for module, name in candidates:
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None:
            found.append(cls)
    return found
