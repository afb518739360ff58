"""Full: keeps every token (the reference every other policy is measured against)."""
from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, register


@register
@dataclass(frozen=True)
class Full(Policy):
    """Keeps every token of every head."""

    name: ClassVar[str] = "full"

    @classmethod
    def example(cls, model=None):
        return cls()

    @classmethod
    def keep_all(cls, model=None):
        return cls()
