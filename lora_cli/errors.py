"""The one exception type that means "the user can fix this": the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, paths), worded as: what is wrong, where, what to do."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C / SIGTERM after saving a checkpoint; the CLI says how to resume, exit 130."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
