"""Exceptions the commands turn into messages and exit codes, not tracebacks."""


class UserError(Exception):
    """Bad input (config, data, paths). The message says what, where, and how to fix it."""


class TrainingStopped(Exception):
    """Training could not go on (e.g. the loss diverged); the last good state was checkpointed."""


class MergeError(Exception):
    """A problem with what the merge was asked for or given; reported without a traceback."""

    exit_code = 2
