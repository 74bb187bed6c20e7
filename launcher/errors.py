"""The launcher's exit codes, one per error class (httpie's way), and the errors that are
only the command line's. Codes 3-7 are the runner's own, so the same mistake gives the same code
on both sides."""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATA = 4
EXIT_MODEL = 5
EXIT_OOM = 6
EXIT_ENVIRONMENT = 7
EXIT_TARGET = 8
EXIT_NO_OFFER = 9
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad flag, an unknown run or GPU, or something not possible yet; the message says which."""

    exit_code = EXIT_USAGE
