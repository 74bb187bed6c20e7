"""The launcher's exit codes, one per error class (httpie's way), and the errors that are
only the command line's. Codes 1-7 and 130 are the runner's own, so the same mistake gives the
same code on both sides."""

from launcher.paths import runner_module

_runner = runner_module()  # the runner's codes are the source: the two sides cannot drift apart
EXIT_INTERNAL = _runner.EXIT_INTERNAL
EXIT_USAGE = _runner.EXIT_USAGE
EXIT_CONFIG = _runner.EXIT_CONFIG
EXIT_DATA = _runner.EXIT_DATA
EXIT_MODEL = _runner.EXIT_MODEL
EXIT_OOM = _runner.EXIT_OOM
EXIT_ENVIRONMENT = _runner.EXIT_ENVIRONMENT
EXIT_INTERRUPTED = _runner.EXIT_INTERRUPTED
# The launcher's own classes.
EXIT_TARGET = 8
EXIT_NO_OFFER = 9
EXIT_BUDGET = 10  # the run's cap (resources.max_total_usd) stopped it, or keeps it from going on


class UsageError(Exception):
    """A bad flag, an unknown run or GPU, or something not possible yet; the message says which."""

    exit_code = EXIT_USAGE
