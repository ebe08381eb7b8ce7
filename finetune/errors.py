"""The one base class for mistakes a user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths). The message says what, where, and how to fix it."""


class TrainingStopped(Exception):
    """Training could not go on (e.g. the loss diverged); the last good state was checkpointed."""
