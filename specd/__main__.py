import signal
import sys

# Until the CLI takes over (importing torch takes seconds), Ctrl-C or SIGTERM exits quietly:
# nothing has been started yet that would need stopping.
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

from specd.cli import main  # noqa: E402

sys.exit(main())
