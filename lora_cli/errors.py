"""The one exception type that means "the user can fix this": the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, paths), worded as: what is wrong, where, what to do."""
