"""Long texts are tokenized in a separate process, so that the API server stays responsive.

The `tokenizers` library holds Python's GIL for the whole of one encode call (about 0.8 s per MB
of text on one core): run in a thread, a 10 MB prompt would freeze every other client of the
server for seconds. In a worker process it costs the server only the copy of the text out and of
the ids back, and the memory the tokenizer takes for a long text is the worker's, not the
server's (the worker hands it back to the OS after each long text).

Only `tokenizers` (through herd.tokenizer) is imported here: the worker starts in a second.
"""

from __future__ import annotations

import array
import concurrent.futures
import ctypes
import multiprocessing
import os
import threading

from herd.tokenizer import PromptTooLong, Tokenizer

_TRIM_CHARS = 1 << 20  # after a text this long, the worker returns freed memory to the OS

_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_json: str, bos_token: str | None) -> None:
    global _worker_tokenizer
    # Background work: one thread, at a lower CPU priority, so that the server's own threads
    # (the event loop, the engine) keep the cores when they are short.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        os.nice(10)
    except OSError:
        pass
    _worker_tokenizer = Tokenizer(tokenizer_json, bos_token=bos_token)


def _encode_in_worker(text: str, options: dict, max_tokens: int | None):
    """-> the ids as packed uint32 bytes, or (tokens, exact) for a text over max_tokens."""
    try:
        ids = _worker_tokenizer.encode(text, max_tokens=max_tokens, **options)
    except PromptTooLong as e:
        return e.tokens, e.exact
    finally:
        if len(text) > _TRIM_CHARS:
            _release_freed_memory()
    return array.array("I", ids).tobytes()


def _release_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise
    except (OSError, AttributeError):
        pass


class TokenizerProcess:
    """One worker process with a copy of `tokenizer`, started on first use; `encode` blocks its
    caller (call it from a worker thread) but never holds the GIL while the worker tokenizes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1,
                    # spawn: forking a process that runs threads (the engine's, the server's) is unsafe
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.tokenizer.to_json(), self.tokenizer.bos_token),
                )
            return self._pool

    def encode(self, text: str, *, max_tokens: int | None = None, **options) -> list[int]:
        """Tokenizer.encode(text, max_tokens=..., **options), run in the worker."""
        pool = self._executor()
        try:
            result = pool.submit(_encode_in_worker, text, options, max_tokens).result()
        except concurrent.futures.process.BrokenProcessPool:
            with self._lock:  # the worker died (out of memory?): the next call starts a new one
                if self._pool is pool:
                    self._pool = None
            raise RuntimeError("the tokenizer process failed") from None
        if isinstance(result, tuple):
            raise PromptTooLong(result[0], max_tokens, exact=result[1])
        ids = array.array("I")
        ids.frombytes(result)
        return ids.tolist()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
