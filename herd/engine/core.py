"""The engine-core process: `herd serve` runs the engine here, away from HTTP, so parsing,
templating, detokenizing, stop strings, SSE and JSON never take turns with the model on one GIL.
The core only samples tokens: it sends token ids (and logprobs), never text; the API server makes
the text and, when a stop string ends a sample, aborts it here (herd.engine.client).

The loop never waits on an API server: it takes whatever messages have arrived (add, abort),
steps while there is work, and sends each API server all of its requests' outputs of the step
in one message. It binds one ZeroMQ ROUTER socket; every API server process connects a DEALER.

Run as `python -m herd.engine.core --address ADDR --parent PID --config JSON` (EngineClient
does that). It exits when its parent dies (no orphans) and ignores SIGINT/SIGTERM: a Ctrl-C or a
supervisor's SIGTERM to the whole process group must let the API server drain its requests;
the owner stops the core with a SHUTDOWN message once it has.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

import msgspec

from herd.engine import messages as m
from herd.engine.engine import Engine, _load_engine
from herd.engine.outputs import RequestTokens

log = logging.getLogger("herd.engine.core")

IDLE_POLL_MS = 500  # how long an idle core waits for a message before looking around again


class EngineCore:
    """The loop's logic without the transport: which API server owns which request, and the
    outputs of one step grouped per API server."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.owner: dict[str, bytes] = {}  # request id -> the API server (socket identity) that sent it
        self.clients: set[bytes] = set()
        self._pending: dict[bytes, m.StepOutputs] = {}
        self._last_stats: dict[bytes, m.EngineStats] = {}

    def ready_info(self) -> m.ReadyInfo:
        e = self.engine
        return m.ReadyInfo(
            pid=os.getpid(),
            model_dir=str(e.model_dir),
            max_num_seqs=e.options.max_num_seqs,
            limits=e.limits,
            generation_defaults=e.generation_defaults,
            accepts_images=e.runner.vision_model is not None,
        )

    def _for(self, client: bytes) -> m.StepOutputs:
        out = self._pending.get(client)
        if out is None:
            out = self._pending[client] = m.StepOutputs([], [], None)  # stats filled in at send time
        return out

    def add_message(self, client: bytes, frames: list) -> None:
        """An ADD message: a request that does not decode (a value its params refuse) fails
        alone, as a bad request; it never ends the loop."""
        try:
            request = m.add_decoder.decode(frames[2].buffer)
        except msgspec.MsgspecError as e:
            rid = m.request_id_of(frames[2].buffer)
            if rid is None:
                log.error("dropped an add message that names no request: %s", e)
                return
            self._for(client).errors.append(m.RequestError(rid, True, m.validation_message(e)))
            return
        self.add(client, request, frames[3:])

    def add(self, client: bytes, request: m.AddRequest, frames: list) -> None:
        rid = request.request_id
        try:
            images = m.images_from_frames(request.images, frames)
            self.engine.add_request(request.prompt_ids, request.params, rid, request.prompt, images)
            self.owner[rid] = client
        except ValueError as e:
            self._for(client).errors.append(m.RequestError(rid, True, str(e)))
        except Exception as e:  # never let one request take the loop down
            log.exception("could not add request %s", rid)
            self._for(client).errors.append(m.RequestError(rid, False, f"the request could not be started: {e}"))

    def abort(self, request_ids: list[str]) -> None:
        """Requests, or single samples of n > 1 (`rid#i`, which a stop string ended)."""
        for rid in request_ids:
            ended = self.engine.abort(rid)
            if ended is not None:
                self._forget(ended)

    def drop_client(self, client: bytes) -> None:
        """An API server is gone (its process died): its requests stop and free their blocks."""
        self.clients.discard(client)
        self._last_stats.pop(client, None)
        self.abort([rid for rid, owner in self.owner.items() if owner == client])

    def _forget(self, rid: str) -> None:
        self.owner.pop(rid, None)

    def step(self) -> None:
        try:
            outputs = self.engine.step_tokens()
        except Exception as e:
            if getattr(e, "fatal", False):
                raise  # the engine cannot go on (a parallel rank died): the process ends, clients see it
            # A failed step (e.g. out of memory on a huge batch) fails the requests in flight,
            # frees their blocks, and the loop goes on serving new ones.
            log.exception("engine step failed; aborting the requests in flight")
            for rid in self.engine.active_request_ids():
                self.engine.abort(rid)
                client = self.owner.get(rid)
                if client is not None:
                    self._for(client).errors.append(m.RequestError(rid, False, f"the engine step failed: {e}"))
                self._forget(rid)
            return
        for out in outputs:
            client = self.owner.get(out.request_id)
            if client is None:
                continue
            self._for(client).outputs.append(self._delta(out))
            if out.finished:
                self._forget(out.request_id)

    @staticmethod
    def _delta(out: RequestTokens) -> m.RequestDelta:
        seqs = [m.SeqDelta(s.index, s.token_ids, s.logprobs, s.finish_reason, s.stop_reason) for s in out.seqs]
        return m.RequestDelta(out.request_id, seqs, out.finished, out.num_cached_tokens, out.prompt_logprobs)

    def take_messages(self) -> list[tuple[bytes, m.StepOutputs]]:
        """One message per API server that has outputs, errors, or figures that changed."""
        stats = self.engine.stats()
        messages = []
        for client in self.clients:
            pending = self._pending.pop(client, None)
            if pending is None and self._last_stats.get(client) == stats:
                continue
            pending = pending or m.StepOutputs([], [], None)
            pending.stats = stats
            self._last_stats[client] = stats
            messages.append((client, pending))
        self._pending.clear()
        return messages


def _die_with_parent(parent_pid: int) -> None:
    """No orphans: the kernel kills this process when its parent dies (Linux), and a watcher
    thread does the same anywhere (the parent may die before prctl took effect)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="herd-parent-watch", daemon=True).start()


def run(address: str, parent_pid: int, config: dict) -> int:
    import zmq

    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    # Sending to an API server that is gone raises (so its requests are aborted), and a slow
    # one queues without limit rather than losing outputs.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(address)  # before loading: clients may say hello while the model loads
    try:
        engine = _load_engine(config.pop("model"), config.pop("dtype", "auto"), config.pop("device", None),
                              config.pop("engine_options", {}))
    except Exception as e:
        log.exception("the engine could not start")
        _refuse_hellos(sock, f"{type(e).__name__}: {e}")
        return 1
    core = EngineCore(engine)
    ready = m.encoder.encode(core.ready_info())
    # Structured outputs: the vocabulary is prepared once, now, in the background (seconds at
    # 202K tokens), not when the first constrained request arrives.
    engine.grammars.warm_up()
    try:
        _loop(sock, core, ready)
    except Exception:
        log.exception("the engine core failed")
        return 1
    finally:
        engine.close()  # the worker ranks of a parallel model
        sock.close(linger=1000)
        context.term()
    return 0


def _refuse_hellos(sock, message: str, wait_s: float = 10.0) -> None:
    """Tells whoever says hello (the API servers, waiting for READY) why the engine did not start."""
    import zmq

    body = m.encoder.encode(message)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if frames[1] == m.HELLO:
                try:
                    sock.send_multipart([frames[0], m.FAILED, body])
                except zmq.ZMQError:
                    continue
                deadline = min(deadline, time.monotonic() + 0.5)  # others may be saying hello too


def _loop(sock, core: EngineCore, ready: bytes) -> None:
    import zmq

    engine = core.engine
    while True:
        # Idle: wait for a message. Busy: take only what has already arrived, then step.
        timeout = 0 if engine.has_unfinished() else IDLE_POLL_MS
        if sock.poll(timeout):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                client, kind = frames[0].bytes, frames[1].bytes
                if kind == m.ADD:
                    core.add_message(client, frames)
                elif kind == m.ABORT:
                    core.abort(m.abort_decoder.decode(frames[2].buffer))
                elif kind == m.HELLO:
                    try:
                        sock.send_multipart([client, m.READY, ready])
                        core.clients.add(client)
                    except zmq.ZMQError:  # it said hello and left (a readiness probe)
                        pass
                elif kind == m.BYE:
                    core.drop_client(client)
                elif kind == m.SHUTDOWN:
                    return
        engine.check_alive()
        if engine.has_unfinished():
            core.step()
        for client, message in core.take_messages():
            try:
                sock.send_multipart([client, m.OUTPUTS, m.encoder.encode(message)])
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                log.warning("an API server went away; aborting its %d requests",
                            sum(1 for owner in core.owner.values() if owner == client))
                core.drop_client(client)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m herd.engine.core")
    p.add_argument("--address", required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--config", required=True, help="JSON: model, dtype, device, engine_options")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.address, args.parent, json.loads(args.config))


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # nothing is left to clean up; skip the interpreter's slow teardown (torch)
