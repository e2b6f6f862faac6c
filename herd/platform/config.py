"""Platform configuration: `herd.toml` (database, auth, per-key limits, prices), with Maverick's
Together prices as defaults.

    [database]
    url = "postgresql://herd@localhost/herd"   # default: sqlite in $HERD_HOME (~/.herd)

    [auth]
    require_api_key = false        # true: 401 without a key even while no key exists

    [limits]                       # per key; a key's own --rpm/--tpm win; 0 = unlimited
    rpm = 600
    tpm = 1000000
    default_reserve_tokens = 1024  # reserved for a request without max_tokens
    window_seconds = 60

    [pricing]                      # USD per 1M tokens, for models without their own entry
    input = 0.27
    output = 0.85
    # cached_input = 0.27          # default: the input price

    [pricing.models."my-model"]
    input = 0.18
    output = 0.59
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.platform.batch_config import BatchConfig, parse_batch_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MAVERICK = "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8"
MAVERICK_INPUT_PRICE = 0.27  # USD per 1M tokens on Together
MAVERICK_OUTPUT_PRICE = 0.85


def herd_home() -> Path:
    return Path(os.environ.get("HERD_HOME") or Path.home() / ".herd").expanduser()


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens."""

    input: float = MAVERICK_INPUT_PRICE
    output: float = MAVERICK_OUTPUT_PRICE
    cached_input: float | None = None  # None: billed as input

    @property
    def blended(self) -> float:
        """The model card's "3:1 blended" price: three input tokens to one output token."""
        return (3 * self.input + self.output) / 4

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached_price = self.input if self.cached_input is None else self.cached_input
        cached = min(max(cached_tokens, 0), prompt_tokens)
        return ((prompt_tokens - cached) * self.input + cached * cached_price + completion_tokens * self.output) / 1e6


@dataclass(frozen=True)
class Limits:
    rpm: int = 600  # requests per minute per key; 0: unlimited
    tpm: int = 1_000_000  # tokens (prompt + completion) per minute per key; 0: unlimited
    default_reserve_tokens: int = 1024  # completion tokens reserved when a request has no max_tokens
    window_seconds: float = 60.0


@dataclass(frozen=True)
class PlatformConfig:
    database_url: str | None = None  # None: sqlite:///$HERD_HOME/herd.db (or $HERD_DATABASE_URL)
    require_api_key: bool = False
    limits: Limits = field(default_factory=Limits)
    default_price: Price = field(default_factory=Price)
    prices: dict[str, Price] = field(default_factory=dict)
    path: Path | None = None  # the file it came from
    batch: BatchConfig = field(default_factory=BatchConfig)  # [batch]: discount, pool, files

    def price_for(self, model: str | None) -> Price:
        return self.prices.get(model or "", self.default_price)

    def resolved_database_url(self) -> str:
        from herd.platform.db import default_url

        return self.database_url or os.environ.get("HERD_DATABASE_URL") or default_url()


def _price(table: dict[str, Any], where: str, base: Price | None = None) -> Price:
    base = base or Price()
    unknown = set(table) - {"input", "output", "cached_input"}
    if unknown:
        raise ValueError(f"{where}: unknown price field(s) {sorted(unknown)}")
    values = {}
    for name in ("input", "output", "cached_input"):
        if name in table:
            v = table[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}.{name} must be a non-negative number of USD per 1M tokens")
            values[name] = float(v)
    return Price(
        input=values.get("input", base.input),
        output=values.get("output", base.output),
        cached_input=values.get("cached_input", base.cached_input),
    )


def _int(table: dict[str, Any], name: str, default: int, where: str) -> int:
    v = table.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{where}.{name} must be a non-negative integer")
    return v


def parse_config(data: dict[str, Any], path: Path | None = None) -> PlatformConfig:
    """Reads the platform's tables of a parsed herd.toml; other tables belong to other parts of herd."""
    db = data.get("database", {})
    auth = data.get("auth", {})
    limits = data.get("limits", {})
    pricing = dict(data.get("pricing", {}))
    url = db.get("url")
    if url is not None and not isinstance(url, str):
        raise ValueError("database.url must be a string")
    require = auth.get("require_api_key", False)
    if not isinstance(require, bool):
        raise ValueError("auth.require_api_key must be true or false")
    window = limits.get("window_seconds", 60.0)
    if not isinstance(window, (int, float)) or isinstance(window, bool) or window <= 0:
        raise ValueError("limits.window_seconds must be a positive number")
    models = pricing.pop("models", {})
    default_price = _price(pricing, "pricing")
    prices = {name: _price(table, f"pricing.models.{name}", default_price) for name, table in models.items()}
    return PlatformConfig(
        database_url=url,
        require_api_key=require,
        limits=Limits(
            rpm=_int(limits, "rpm", Limits.rpm, "limits"),
            tpm=_int(limits, "tpm", Limits.tpm, "limits"),
            default_reserve_tokens=_int(limits, "default_reserve_tokens", Limits.default_reserve_tokens, "limits"),
            window_seconds=float(window),
        ),
        default_price=default_price,
        prices=prices,
        path=path,
        batch=parse_batch_config(data.get("batch", {})),
    )


def load_config(path: str | os.PathLike | None = None) -> PlatformConfig:
    """`path`, else $HERD_HOME/herd.toml when it exists, else the defaults."""
    if path is None:
        candidate = herd_home() / "herd.toml"
        if not candidate.exists():
            return PlatformConfig()
        path = candidate
    path = Path(path)
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    try:
        return parse_config(data, path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
