"""together's upload step 2 is a PUT of the file's bytes, sent without an API key to the URL the
server handed out: that URL's random token is the authorisation (herd.platform.files checks it).
Both auth middlewares let exactly these requests through; nothing else skips the key check."""

from __future__ import annotations

import re

_PATH = re.compile(r"^(/v1)?/v1/files/[A-Za-z0-9._-]+/content$")


def is_signed_upload(scope) -> bool:
    return (
        scope.get("method") == "PUT"
        and bool(_PATH.match(scope.get("path", "")))
        and b"upload_token=" in scope.get("query_string", b"")
    )


def is_upload(scope) -> bool:
    """Requests that carry file bytes (they get the upload size limit, not the body limit)."""
    path = scope.get("path", "")
    return (scope.get("method") == "POST" and path.rstrip("/").endswith("/files")) or is_signed_upload(scope)
