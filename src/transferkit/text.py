"""Small helpers for the text a user reads."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` and the noun, singular for one: "1 image", "3 images", "2 classes" (nouns in -s/-sh/-ch/-x take
    -es; pass `nouns` for any other irregular plural)."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count:,} {nouns or (noun + 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else noun + 's')}"
