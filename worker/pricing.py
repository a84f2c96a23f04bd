"""Bid prices from ``--price-list`` (PROTOCOL.md §4).

``Price.Amount`` = fee + timeout × (CPU × cpu_second + memory GiB × memory_gib_second +
GPU × gpu_second), the timeout being the job's or the node's default, in the list's
``currency``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from schemas.compute import Price
from worker.capacity.usage import ResourceUsage

GIB = float(1 << 30)


class PriceList(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fee: float = 0.0
    cpu_second: float = 0.0
    memory_gib_second: float = 0.0
    gpu_second: float = 0.0
    currency: str = "USD"

    def price(self, usage: ResourceUsage, timeout: float) -> Price:
        rate = (
            usage.CPU * self.cpu_second
            + usage.Memory / GIB * self.memory_gib_second
            + usage.GPU * self.gpu_second
        )
        return Price(Amount=round(self.fee + timeout * rate, 9), Unit=self.currency)


class PriceListError(ValueError):
    """The price list file is unreadable or has unknown keys or bad values."""


def load_price_list(path: str | Path) -> PriceList:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        prices = msgspec.convert(data, PriceList)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise PriceListError(f"price list {path}: {exc}") from exc
    for name in ("fee", "cpu_second", "memory_gib_second", "gpu_second"):
        if getattr(prices, name) < 0:
            raise PriceListError(f"price list {path}: {name} must not be negative")
    return prices
