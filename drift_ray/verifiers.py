"""Verifiers: decide whether a parsed answer matches the gold answer, and normalise answers.

Pluggable by name through `get_verifier`. Every verifier has the same two methods; `normalize` gives
the canonical form used to count distinct answers (the repetition term of the return).
"""

from __future__ import annotations

from typing import Callable, Protocol


class Verifier(Protocol):
    name: str

    def normalize(self, answer: str) -> str:
        """Canonical form of an answer (for counting distinct answers)."""
        ...

    def check(self, answer: str, gold: str) -> bool:
        """True when `answer` is correct for `gold`. Never raises and never hangs: failures are False."""
        ...


def basic_normalize(text: str) -> str:
    """Lowercase with all whitespace removed (the authors' normalisation)."""
    return "".join(text.lower().split())


class ExactVerifier:
    """Correct when the normalised answer equals the normalised gold."""

    name = "exact"

    def normalize(self, answer: str) -> str:
        return basic_normalize(answer)

    def check(self, answer: str, gold: str) -> bool:
        return basic_normalize(answer) == basic_normalize(gold)


_REGISTRY: dict[str, Callable[[], Verifier]] = {"exact": ExactVerifier}


def register_verifier(name: str, factory: Callable[[], Verifier]) -> None:
    _REGISTRY[name] = factory


def get_verifier(name: str) -> Verifier:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
