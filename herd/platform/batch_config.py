"""`[batch]` in herd.toml: the batch API's discount, how much of the engine it may take, its own
per-key rate-limit pool, and where uploaded files live.

    [batch]
    discount = 0.5          # fraction off every token's price for batch lines (0.5: 50% off)
    max_in_flight = 8       # batch lines in the engine at once, all batches together
    busy_max_in_flight = 2  # ... while interactive requests are being served (or were, 2 s ago)
    priority = 1            # scheduling priority of batch lines (interactive: 0; lower runs sooner)
    rpm = 0                 # per key, batch lines started per minute (0: unlimited)
    tpm = 0                 # per key, batch tokens (prompt + max_tokens) per minute (0: unlimited)
    max_lines = 50000       # lines per input file
    max_file_bytes = 209715200   # 200 MB, OpenAI's batch input limit
    files_dir = "/data/herd-files"  # default: $HERD_HOME/files
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BatchConfig:
    discount: float = 0.5
    max_in_flight: int = 8
    busy_max_in_flight: int = 2
    priority: int = 1
    rpm: int = 0
    tpm: int = 0
    max_lines: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    files_dir: str | None = None

    def resolved_files_dir(self) -> Path:
        from herd.platform.config import herd_home

        return Path(self.files_dir).expanduser() if self.files_dir else herd_home() / "files"


def parse_batch_config(table: dict[str, Any]) -> BatchConfig:
    unknown = set(table) - set(BatchConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"batch: unknown field(s) {sorted(unknown)}")
    discount = table.get("discount", BatchConfig.discount)
    if not isinstance(discount, (int, float)) or isinstance(discount, bool) or not 0 <= discount <= 1:
        raise ValueError("batch.discount must be a number in [0, 1] (0.5: half price)")
    values: dict[str, Any] = {"discount": float(discount)}
    for name in ("max_in_flight", "busy_max_in_flight", "rpm", "tpm", "max_lines", "max_file_bytes"):
        v = table.get(name, getattr(BatchConfig, name))
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"batch.{name} must be a non-negative integer")
        values[name] = v
    priority = table.get("priority", BatchConfig.priority)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError("batch.priority must be an integer (interactive requests run at 0)")
    values["priority"] = priority
    if values["max_in_flight"] < 1 or values["busy_max_in_flight"] < 1:
        raise ValueError("batch.max_in_flight and batch.busy_max_in_flight must be at least 1")
    files_dir = table.get("files_dir")
    if files_dir is not None and not isinstance(files_dir, str):
        raise ValueError("batch.files_dir must be a string")
    return BatchConfig(files_dir=files_dir or None, **values)
