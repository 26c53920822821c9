"""Cost-model test doubles for the simulator's tests."""

from __future__ import annotations

from tandem.sim.types import StepShape


class StepCost:
    """Every step takes `seconds`; hand-offs are free."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_seconds(self, step: StepShape) -> float:
        return self.seconds

    def transfer_seconds(self, nbytes: int) -> float:
        return 0.0

    def kv_bytes_per_token(self) -> int:
        return 1000
