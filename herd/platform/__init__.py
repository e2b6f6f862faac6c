"""The platform layer: API keys, per-key rate limits, and the usage and cost ledger, in SQLite
(default, $HERD_HOME/herd.db) or PostgreSQL. Imports SQLAlchemy; herd.model and herd.engine never
import this package."""

from herd.platform.config import PlatformConfig, Price, load_config
from herd.platform.db import Database, open_database
from herd.platform.keys import ApiKey, KeyStore
from herd.platform.ledger import Ledger, UsageRecord
from herd.platform.ratelimit import RateLimited, RateLimiter

__all__ = [
    "ApiKey", "Database", "KeyStore", "Ledger", "PlatformConfig", "Price", "RateLimited", "RateLimiter",
    "UsageRecord", "load_config", "open_database",
]
