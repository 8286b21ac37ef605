"""User-facing errors.

A `UserError` is a mistake the user can fix (bad card, unknown name, malformed file).
The CLI prints its message as one line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line with the fix."""

    exit_code = 2


class MissingField(UserError):
    """A data file lacks the column or key a field is read from (the card's `fields`, or
    the default name). Its own type so `predict`, which takes no card, can say the names
    come from the run's card and keep the reader's `where` and `what`; `field` is the
    field it was read as (`label`, `sequence`, ...) where the reader knows it."""

    def __init__(self, where: str, what: str, fix: str, field: str | None = None):
        super().__init__(f"{where}: {what}; {fix}")
        self.where, self.what, self.field = where, what, field


def did_you_mean(name: str, known) -> str:
    """`known: a, b, c` with a close match first where there is one."""
    import difflib

    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"
