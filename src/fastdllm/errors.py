"""User-facing errors.

Every problem a user can cause (bad path, bad option, unsupported checkpoint) is raised as a
`FastDLLMError` whose message names the problem and the fix. The CLI prints the message alone,
never a traceback; the server turns it into a 4xx response.
"""


class FastDLLMError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field
