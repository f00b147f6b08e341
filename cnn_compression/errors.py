"""The one root of user errors: every script reports these as one line on stderr with exit code 2."""


class UserError(Exception):
    """Bad input (a flag, a file, the data, a model that does not fit the stage), not a bug."""
