"""What every entry script shares: turning user errors into one line on stderr and exit code 2."""
import sys

from src.errors import ArcFaceError


def run_main(main, argv=None):
    """Call main(argv); an ArcFaceError becomes `error: <message>` and exit code 2, running out of
    memory one line and exit code 1, Ctrl-C exit 130."""
    try:
        return main(argv)
    except ArcFaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (the input, or the model or batch size asked for, does not fit in the "
              "memory of this machine)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
