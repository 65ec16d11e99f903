"""Token lengths as users write them: 8192, "8k" (k = 1024), "1.5k". One reader for every verb and recipe."""

from __future__ import annotations

import re

from .errors import ParameterValueError

LENGTH_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*$")


def parse_length(text: str | int) -> int:
    """"8k" -> 8192, "12288" -> 12288, "1.5k" -> 1536; anything else is a `ParameterValueError`."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = LENGTH_PATTERN.match(str(text))
        if not match:
            raise ParameterValueError(f"length {text!r} is not a number: write it as tokens, e.g. 8192 or 8k (k = 1024)")
        number = float(match.group(1)) * (1024 if match.group(2) else 1)
        if number != int(number):
            raise ParameterValueError(f"length {text!r} is not a whole number of tokens")
        value = int(number)
    if value <= 0:
        raise ParameterValueError(f"length {text!r} must be a positive number of tokens")
    return value
