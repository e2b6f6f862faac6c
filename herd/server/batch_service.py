"""What the Files and Batches routes share: the stores and the runner (made when the app has the
platform: they live in its database), who is calling, and which SDK is asking.

Where the OpenAI and together SDKs expect different shapes on one route (a batch list as an
object or a bare array, lower- or upper-case statuses), the request's User-Agent decides:
together's SDKs send `Together/Python x`; everything else gets OpenAI's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from herd.server.errors import APIError


@dataclass
class BatchService:
    files: object  # herd.platform.files.FileStore
    batches: object  # herd.platform.batches.BatchStore
    runner: object  # herd.server.batch_runner.BatchRunner
    config: object  # herd.platform.batch_config.BatchConfig


def make_batch_service(st, platform) -> BatchService:
    from herd.platform.batches import BatchStore
    from herd.platform.files import FileStore
    from herd.server.batch_runner import BatchRunner

    config = platform.config.batch
    files = FileStore(platform.db, config.resolved_files_dir(), max_bytes=config.max_file_bytes, clock=platform.clock)
    batches = BatchStore(platform.db, clock=platform.clock)
    return BatchService(files, batches, BatchRunner(st, platform, files, batches, config), config)


def batch_service(request: Request) -> BatchService:
    svc = getattr(request.app.state, "herd_batch", None)
    if svc is None:
        raise APIError(501, "the Files and Batches APIs keep their state in the platform database; this server "
                            "runs without it (--no-platform)", code="not_implemented")
    return svc


def caller_key(request: Request) -> int | None:
    caller = request.scope.get("state", {}).get("herd_caller")
    return None if caller is None else caller.key_id


def is_together(request: Request) -> bool:
    return request.headers.get("user-agent", "").startswith("Together/")
