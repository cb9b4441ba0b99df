"""User-facing errors.

Every problem a user can cause (bad path, bad option, unsupported checkpoint) is raised as a
`FastDLLMError` that says, without naming any front end's words, what is wrong (`message`,
naming values by their field names), which value is at fault (`field`) and which settings would
fix it (`fixes`). Each front end words the fixes its own way with `describe(spell)`: `str(e)`
spells them as command-line options (`--sub-block-size 8`, the words of the CLI and of the
docs, which the Python API shares); the server spells them as request fields
(`"sub_block_size": 8`). The CLI prints the message alone, never a traceback; the server turns
it into a 4xx response.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

Spell = Callable[[str, Any], str]  # (field, suggested value or None) -> a front end's words


def as_option(field: str, value: Any = None) -> str:
    """A setting as a command-line option: ("sub_block_size", 8) -> `--sub-block-size 8`."""
    option = "--" + field.replace("_", "-")
    if value is None or value is True:
        return option
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{option} {value}"


class FastDLLMError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""

    def __init__(self, message: str, *, field: str | None = None,
                 fixes: Sequence[tuple[str, Any]] = ()):
        self.message = message
        self.field = field
        self.fixes = tuple(fixes)  # (field, suggested value or None): any one of them would do
        super().__init__(self.describe(as_option))

    def describe(self, spell: Spell) -> str:
        """The message with its fixes in one front end's words."""
        if not self.fixes:
            return self.message
        return f"{self.message}; try " + " or ".join(spell(f, v) for f, v in self.fixes)
