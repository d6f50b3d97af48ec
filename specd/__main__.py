import signal
import sys

# Until the CLI takes over (importing torch takes seconds), Ctrl-C or SIGTERM exits quietly:
# nothing has been started yet that would need stopping. An exit that lands in an import's
# clean-up would be reported by Python as "Exception ignored": it is not an error.
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
_hook = sys.unraisablehook


def _quiet(info: object) -> None:
    if isinstance(getattr(info, "exc_value", None), SystemExit | KeyboardInterrupt):
        # Python could not raise the exit where it landed: deliver it again, where it can land
        # (going on would run the command with whatever import it interrupted half done).
        signal.raise_signal(signal.SIGINT)
        return
    _hook(info)  # type: ignore[arg-type]


sys.unraisablehook = _quiet

from specd.cli import main  # noqa: E402

sys.exit(main())
