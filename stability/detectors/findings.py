"""`Findings`: what `verdict.diagnose` has found so far, shared by the rules that add to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Findings:
    """What `diagnose` has found so far, each list in the order found. `band`: detect.band, the
    relative width around a threshold within which a finding is borderline (lo..hi)."""

    band: float
    flags: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    borderline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lo(self) -> float:
        """1 - band: the lower edge of the borderline band, relative to a threshold."""
        return 1.0 - self.band

    @property
    def hi(self) -> float:
        """1 + band: the upper edge of the borderline band, relative to a threshold."""
        return 1.0 + self.band

    def lists(self) -> dict[str, list[dict[str, Any]]]:
        """{"flags", "warnings", "borderline"}: the findings as `diagnose` returns them."""
        return {"flags": self.flags, "warnings": self.warnings, "borderline": self.borderline}
