"""Resource amounts and their arithmetic (Bacalhau ``model.ResourceUsageData``).

Unlike Go's unsigned subtraction, ``sub`` clamps each dimension at 0 on its own.
``fill_defaults`` is Bacalhau's ``Intersect``: a field that is 0 takes the other's.
"""

from __future__ import annotations

import msgspec


class ResourceUsage(msgspec.Struct, frozen=True, kw_only=True):
    """CPU in cores, Memory and Disk in bytes, whole GPUs."""

    CPU: float = 0.0
    Memory: int = 0
    Disk: int = 0
    GPU: int = 0

    def add(self, other: ResourceUsage) -> ResourceUsage:
        return ResourceUsage(
            CPU=round(self.CPU + other.CPU, 9),
            Memory=self.Memory + other.Memory,
            Disk=self.Disk + other.Disk,
            GPU=self.GPU + other.GPU,
        )

    def sub(self, other: ResourceUsage) -> ResourceUsage:
        return ResourceUsage(
            CPU=max(0.0, round(self.CPU - other.CPU, 9)),
            Memory=max(0, self.Memory - other.Memory),
            Disk=max(0, self.Disk - other.Disk),
            GPU=max(0, self.GPU - other.GPU),
        )

    def fill_defaults(self, defaults: ResourceUsage) -> ResourceUsage:
        return ResourceUsage(
            CPU=self.CPU if self.CPU > 0 else defaults.CPU,
            Memory=self.Memory if self.Memory > 0 else defaults.Memory,
            Disk=self.Disk if self.Disk > 0 else defaults.Disk,
            GPU=self.GPU if self.GPU > 0 else defaults.GPU,
        )

    def max(self, other: ResourceUsage) -> ResourceUsage:
        return ResourceUsage(
            CPU=max(self.CPU, other.CPU),
            Memory=max(self.Memory, other.Memory),
            Disk=max(self.Disk, other.Disk),
            GPU=max(self.GPU, other.GPU),
        )

    def min(self, other: ResourceUsage) -> ResourceUsage:
        return ResourceUsage(
            CPU=min(self.CPU, other.CPU),
            Memory=min(self.Memory, other.Memory),
            Disk=min(self.Disk, other.Disk),
            GPU=min(self.GPU, other.GPU),
        )

    def le(self, other: ResourceUsage) -> bool:
        """Every dimension ≤ the other's (Go ``LessThanEq``)."""
        return (
            self.CPU <= other.CPU + 1e-9
            and self.Memory <= other.Memory
            and self.Disk <= other.Disk
            and self.GPU <= other.GPU
        )

    def exceeded(self, other: ResourceUsage) -> list[str]:
        """The names of the dimensions in which ``self`` is above ``other``."""
        names = []
        if self.CPU > other.CPU + 1e-9:
            names.append("CPU")
        if self.Memory > other.Memory:
            names.append("Memory")
        if self.Disk > other.Disk:
            names.append("Disk")
        if self.GPU > other.GPU:
            names.append("GPU")
        return names

    def is_zero(self) -> bool:
        return self.CPU == 0 and self.Memory == 0 and self.Disk == 0 and self.GPU == 0


ZERO = ResourceUsage()
