"""One clear last line for a failed run: the bundle's own message, repeated after MONAI's wrapped traceback."""

from __future__ import annotations

import os
import sys

__all__ = ["bundle_cause", "install_error_summary"]


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _raised_here(exc: BaseException) -> bool:
    package = os.path.dirname(os.path.abspath(__file__))
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and os.path.abspath(last).startswith(package)


def bundle_cause(exc: BaseException) -> BaseException | None:
    """The innermost exception of ``exc``'s chain raised by this bundle's own code (one of its checks, whose message
    is one line naming the fix), or ``None``: the root cause under MONAI's ``RuntimeError("Failed to evaluate")``."""
    ours = [e for e in _chain(exc) if _raised_here(e)]
    return ours[-1] if ours else None


def install_error_summary() -> None:
    """Make the last line of a failed run's output the bundle's own message, not MONAI's wrapper.

    MONAI re-raises a config expression's error inside ``RuntimeError("Failed to evaluate ...")``; when the root
    cause is one of this bundle's checks (bad datalist, unreadable image, mismatched checkpoint, bad size or key),
    its one-line message is printed again after the traceback as ``ERROR: ...``.
    """
    previous = sys.excepthook
    if getattr(previous, "_bundle_summary", False):
        return

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        previous(exc_type, exc, tb)
        cause = bundle_cause(exc)
        if cause is not None:
            print(f"\nERROR: {type(cause).__name__}: {str(cause).strip(chr(39) + chr(34))}", file=sys.stderr)

    hook._bundle_summary = True  # type: ignore[attr-defined]
    sys.excepthook = hook
