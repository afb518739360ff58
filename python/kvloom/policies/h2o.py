"""H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models"): every head keeps the ``recent`` newest tokens plus the
heavy hitters, the ``ceil(ratio x tokens seen)`` older tokens with the most accumulated
attention (ties keep the older token)."""
from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, param, register


@register
@dataclass(frozen=True)
class HeavyHitter(Policy):
    """Keeps the ``recent`` newest tokens and the ``ratio`` heaviest hitters of every head."""

    name: ClassVar[str] = "h2o"
    aliases: ClassVar[tuple] = ("heavy_hitter", "heavyhitter")
    needs_scores: ClassVar[bool] = True
    ratio: float = param(0.1, "heavy hitters kept, as a fraction of the tokens seen", lo=0.0, hi=1.0)
    recent: int = param(64, "newest tokens kept", lo=1)

    def plan(self):
        from .. import _core

        return _core.make_plan("heavy_hitter", {"ratio": self.ratio, "recent": self.recent})

    @classmethod
    def example(cls, model=None):
        return cls(ratio=0.2, recent=6)

    @classmethod
    def keep_all(cls, model=None):
        return cls(ratio=1.0, recent=1)
