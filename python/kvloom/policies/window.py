"""StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention
Sinks"): every head keeps the first ``sinks`` tokens and the ``recent`` newest."""
from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, param, register


@register
@dataclass(frozen=True)
class Window(Policy):
    """Keeps the ``sinks`` first and the ``recent`` newest tokens of every head."""

    name: ClassVar[str] = "window"
    aliases: ClassVar[tuple] = ("streamingllm",)
    sinks: int = param(4, "first tokens kept (attention sinks)", lo=0)
    recent: int = param(1024, "newest tokens kept", lo=1)

    def plan(self):
        from .. import _core

        return _core.make_plan("window", {"sinks": self.sinks, "recent": self.recent})

    @classmethod
    def example(cls, model=None):
        return cls(sinks=2, recent=8)

    @classmethod
    def keep_all(cls, model=None):
        return cls(sinks=0, recent=1 << 30)
