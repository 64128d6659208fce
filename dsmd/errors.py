"""The one base class for problems with the user's input (paths, data, checkpoints).

Commands print these as one clear message without a traceback; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """Something the user can fix: the message says what is wrong and what to do."""
