"""Health of a node or an edge from its error ratio, with tolerances as Kiali has them.

An element is ``failing`` at or above the failing ratio, ``degraded`` at or above
the degraded ratio, ``healthy`` below, and ``idle`` when it carried no requests in
the window (idle but with replies still waiting counts as degraded: something
was sent and nothing came back).
"""

import dataclasses

HEALTHY, DEGRADED, FAILING, IDLE = "healthy", "degraded", "failing", "idle"
COLOURS = {HEALTHY: "#2e7d32", DEGRADED: "#f9a825", FAILING: "#c62828", IDLE: "#9e9e9e"}


@dataclasses.dataclass(frozen=True)
class Tolerances:
    degraded: float = 0.01
    failing: float = 0.05

    def __post_init__(self):
        if not 0 <= self.degraded <= self.failing <= 1:
            raise ValueError("error ratio tolerances must satisfy "
                             f"0 <= degraded ({self.degraded}) <= failing ({self.failing}) <= 1")

    def classify(self, error_ratio, rate, waiting=0.0):
        if rate <= 0:
            return DEGRADED if waiting > 0 else IDLE
        if error_ratio >= self.failing:
            return FAILING
        if error_ratio >= self.degraded:
            return DEGRADED
        return HEALTHY
