"""A count in a user-facing message with its noun in the right number: "1 testing case", "2 testing cases".

Why it exists: messages such as ``f"{n} testing cases"`` printed "1 testing cases". Standard library only.
"""


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural (``plural``, default ``noun + "s"``) unless ``count`` is 1."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
