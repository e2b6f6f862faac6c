"""The API server's side of the engine-core boundary.

EngineClient starts the engine-core process (herd.engine.core) and owns it, or connects to one
that a supervisor started (`--api-server-count N`). Coroutines call `generate()`; one background
thread owns the ZeroMQ socket: it forwards what coroutines send, receives each step's outputs
(token ids only), makes their text (herd.engine.outputs.RequestText: detokenizing, stop strings)
and hands every request its RequestOutput on its own asyncio queue. When a stop string ends a
sample, that thread aborts the sample in the core at once, so its KV blocks are freed within a
step; what the core sampled after it is dropped. If the core process dies, every
request in flight fails at once and `is_running` turns False.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import zmq

from herd.config import load_config
from herd.engine import messages as m
from herd.engine.engine import EngineStats
from herd.engine.outputs import RequestOutput, RequestText, sequence_id
from herd.engine.request import ImageInput
from herd.engine.sampling import SamplingParams
from herd.model_source import resolve_model_dir
from herd.tokenizer import Tokenizer

log = logging.getLogger("herd.engine.client")

LIVENESS_CHECK_S = 0.2  # how often the receiver looks whether the core process is still there


class EngineStartError(RuntimeError):
    """The engine-core process could not load the model (the message says why)."""


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; the requests it held are lost."""


def start_core_process(model, dtype="auto", device=None, **engine_options) -> tuple[subprocess.Popen, str, Path]:
    """Starts `python -m herd.engine.core`; returns the process, its address and the folder of
    its socket. Engine options pass through untouched, whatever they are (JSON values)."""
    # Here, once: the default model is converted, a Hub id downloaded, and a bad path fails early.
    source = {k: engine_options.pop(k) for k in ("revision", "download_dir") if k in engine_options}
    model_dir = resolve_model_dir(model, **source)
    folder = Path(tempfile.mkdtemp(prefix="herd-"))
    address = f"ipc://{folder}/engine-core"
    config = {
        "model": str(model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device) if device is not None else None,
        "engine_options": engine_options,
    }
    env = dict(os.environ)
    # The child imports the same herd as this process, wherever that came from.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "herd.engine.core", "--address", address, "--parent", str(os.getpid()),
         "--config", json.dumps(config)],
        env=env,
    )
    return process, address, folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child its parent has not reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True


def handshake(sock, process: subprocess.Popen | None, core_pid: int | None, timeout: float | None) -> m.ReadyInfo:
    """Says hello on `sock` (a DEALER connected to the core) and waits for READY while the core
    process lives; its FAILED answer (or its death) is an EngineStartError."""
    sock.send(m.HELLO)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if sock.poll(100):
            kind, *rest = sock.recv_multipart()
            if kind == m.READY:
                return m.ready_decoder.decode(rest[0])
            if kind == m.FAILED:
                raise EngineStartError(f"the engine could not start: {m.text_decoder.decode(rest[0])}")
        if process is not None and process.poll() is not None:
            raise EngineStartError(
                f"the engine-core process exited with status {process.returncode} while starting "
                "(its log above says why)"
            )
        if core_pid is not None and not pid_alive(core_pid):
            raise EngineStartError("the engine-core process is gone")
        if deadline is not None and time.monotonic() > deadline:
            raise EngineStartError(f"the engine core did not answer within {timeout:.0f} s")


def wait_until_ready(address: str, process: subprocess.Popen, timeout: float | None = None) -> m.ReadyInfo:
    """For a supervisor that starts the core for other processes: returns once the model is loaded."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 500)
    try:
        sock.connect(address)
        info = handshake(sock, process, None, timeout)
        sock.send(m.BYE)
        return info
    finally:
        sock.close()
        context.term()


class EngineClient:
    """What the server uses of the engine: generate, abort, stats, limits, tokenizer, config."""

    def __init__(self, address: str, *, process: subprocess.Popen | None = None, core_pid: int | None = None,
                 folder: Path | None = None, on_death: Callable[[str], None] | None = None,
                 startup_timeout: float | None = None):
        self.address = address
        self.process = process  # set when this client owns the core
        self._folder = folder
        self.on_death = on_death
        self.error: str | None = None
        self._closed = False
        self._context = zmq.Context()
        self._core = self._context.socket(zmq.DEALER)
        self._core.setsockopt(zmq.LINGER, 0)
        self._core.connect(address)
        try:
            self.info = handshake(self._core, process, core_pid, startup_timeout)
        except BaseException:
            self._stop_process()
            self._core.close()
            self._context.term()
            raise
        self.core_pid = self.info.pid
        self.model_dir = Path(self.info.model_dir)
        self.config = load_config(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.limits = self.info.limits
        self.max_model_len = self.limits.max_model_len
        self.max_num_seqs = self.info.max_num_seqs
        self.accepts_images = self.info.accepts_images
        self.generation_defaults = self.info.generation_defaults
        self._stats = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)
        # request id -> its consumer's event loop, its queue, and its text (the receiver's alone)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, RequestText]] = {}
        # Coroutines on any thread send through this inproc pair; only the receiver thread
        # touches the socket to the core (ZeroMQ sockets belong to one thread).
        self._send_lock = threading.Lock()
        inbox = f"inproc://herd-client-{id(self)}"
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.bind(inbox)
        self._outbox = self._context.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.connect(inbox)
        self._thread = threading.Thread(target=self._receive, name="herd-engine-client", daemon=True)
        self._thread.start()

    # -- starting -------------------------------------------------------------------------------
    @classmethod
    def start(cls, model: str | Path | None = None, *, dtype="auto", device=None,
              on_death: Callable[[str], None] | None = None, startup_timeout: float | None = None,
              **engine_options: Any) -> EngineClient:
        """Starts an engine-core process for `model` and connects to it; returns once the model
        is loaded. A core that cannot load the model raises EngineStartError with its reason."""
        process, address, folder = start_core_process(model, dtype, device, **engine_options)
        return cls(address, process=process, folder=folder, on_death=on_death, startup_timeout=startup_timeout)

    # -- what the server uses ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.error is None and not self._closed

    def stats(self) -> EngineStats:
        return self._stats

    def default_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams from the checkpoint's defaults, with `overrides` on top."""
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a clear message for a request the engine cannot take."""
        self.limits.check(prompt_ids, params)

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        images: list[ImageInput] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams outputs (with deltas) until the last, which has finished=True.

        Raises ValueError for a request the engine cannot take, RuntimeError when the engine
        fails it (or dies). If the consumer stops early, the request is aborted at once."""
        if not self.is_running:
            raise RuntimeError(f"the engine is not running{': ' + self.error if self.error else ''}")
        self.check_prompt(prompt_ids, params)
        if images and not self.accepts_images:
            raise ValueError("this model has no vision tower: image inputs are not supported")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        text = RequestText(request_id, list(prompt_ids), prompt, params, self.tokenizer)
        self._streams[request_id] = (asyncio.get_running_loop(), stream, text)
        if self.error is not None:  # it died after the check above: nothing would answer
            self._streams.pop(request_id, None)
            raise EngineDeadError(self.error)
        metas, frames = m.image_frames(images)
        self._send([m.ADD, m.encoder.encode(m.AddRequest(request_id, list(prompt_ids), params, prompt, metas)), *frames])
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the core has already forgotten it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if self.is_running:
            self._send([m.ABORT, m.encoder.encode([request_id])])

    def _send(self, frames: list) -> None:
        with self._send_lock:
            if not self._closed:
                self._outbox.send_multipart(frames, copy=len(frames) < 3)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the receiver and, if this client owns it, the engine-core process."""
        if self._closed:
            return
        if self.error is None:  # the owner stops the core; a client of a shared one just leaves
            self._send([m.SHUTDOWN if self.process is not None else m.BYE])
        with self._send_lock:
            self._closed = True
        self._thread.join(timeout)
        self._stop_process(timeout)
        self._outbox.close(linger=0)
        self._inbox.close(linger=0)
        self._core.close(linger=500)  # SHUTDOWN or BYE may still be on its way
        self._context.term()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _stop_process(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    # -- the receiver thread -------------------------------------------------------------------
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._core, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        next_check = time.monotonic() + LIVENESS_CHECK_S
        try:
            while True:
                events = dict(poller.poll(int(LIVENESS_CHECK_S * 1000)))
                if self._inbox in events:
                    self._forward()
                if self._closed:
                    self._forward()  # the SHUTDOWN message, if it is the last thing sent
                    return
                if self._core in events:
                    while True:
                        try:
                            kind, body = self._core.recv_multipart(zmq.NOBLOCK)[:2]
                        except zmq.Again:
                            break
                        if kind == m.OUTPUTS:
                            self._dispatch(m.outputs_decoder.decode(body))
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + LIVENESS_CHECK_S
                    reason = self._death_reason()
                    if reason is not None:
                        self._die(reason)
                        return
        except Exception as e:  # a bug here must not leave requests hanging
            log.exception("the engine client's receiver failed")
            self._die(f"the engine client failed: {e}")

    def _forward(self) -> None:
        while True:
            try:
                frames = self._inbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._core.send_multipart(frames, copy=False)

    def _death_reason(self) -> str | None:
        if self.process is not None:
            status = self.process.poll()
            if status is not None:
                return f"the engine-core process died (exit status {status})"
        elif not pid_alive(self.core_pid):
            return "the engine-core process died"
        return None

    def _dispatch(self, message: m.StepOutputs) -> None:
        self._stats = message.stats
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        aborts: list[str] = []
        for delta in message.outputs:
            target = self._streams.get(delta.request_id)
            if target is None:
                continue
            loop, stream, text = target
            if text.finished:
                continue  # a stop string ended it here; the core's abort may still be on its way
            try:
                item, stopped = text.add(delta)
            except Exception as e:  # one request's text must not take the others down
                log.exception("could not make the text of request %s", delta.request_id)
                item, stopped = RuntimeError(f"the engine output could not be decoded: {e}"), []
                if not delta.finished:
                    aborts.append(delta.request_id)
            if stopped:  # stop strings ended these samples: the core stops them now
                if item.finished and not delta.finished:
                    aborts.append(delta.request_id)
                elif not item.finished:
                    aborts += [sequence_id(delta.request_id, len(text.seqs), i) for i in stopped]
            by_loop.setdefault(loop, []).append((stream, item))
        for error in message.errors:
            target = self._streams.get(error.request_id)
            if target is not None:
                item = ValueError(error.message) if error.invalid else RuntimeError(error.message)
                by_loop.setdefault(target[0], []).append((target[1], item))
        if aborts:
            self._core.send_multipart([m.ABORT, m.encoder.encode(aborts)])
        for loop, items in by_loop.items():  # one wake-up per event loop per step
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed; its requests are gone already
                pass

    def _die(self, reason: str) -> None:
        self.error = reason
        log.error("%s; failing %d requests in flight", reason, len(self._streams))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, stream, _ in list(self._streams.values()):
            by_loop.setdefault(loop, []).append((stream, EngineDeadError(reason)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass
        if self.on_death is not None:
            self.on_death(reason)


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.put_nowait(item)
