"""`herd serve --api-server-count N`: N HTTP processes on one port in front of one engine core.

This process supervises: it checks the options, starts the engine-core process and waits until
the model is loaded, binds N listening sockets to the port (SO_REUSEPORT: the kernel spreads
connections over them), then starts N copies of `herd serve`, one per socket, that all talk to
the one engine core. It serves nothing itself.

It ends with its children: SIGTERM or Ctrl-C is passed on to the API servers, which drain and exit
0, then the core is stopped. If the engine core or an API server dies, the rest are stopped and
the exit status is 1, so a supervisor restarts the whole server. If this process is killed, the
kernel kills its children (they die with their parent).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from herd.engine.client import EngineStartError, pid_alive, start_core_process, wait_until_ready

log = logging.getLogger("herd.server")

POLL_S = 0.2
STOP_TIMEOUT_S = 15.0  # after the drain time, how long API servers get to exit before they are killed


def serve_many(args, argv: list[str], model_dir, engine_options: dict) -> int:
    """`argv`: this command's own arguments, passed on to each API server."""
    count = args.api_server_count
    core, address, folder = start_core_process(model_dir, args.dtype, args.device, **engine_options)
    try:
        wait_until_ready(address, core)
    except EngineStartError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        _stop(core)
        return 1
    listeners = _listening_sockets(args.host, args.port, count)
    child_argv = [sys.executable, "-m", "herd.cli", "serve", *_without(argv, "--api-server-count"),
                  "--engine-address", address, "--engine-pid", str(core.pid), "--supervisor-pid", str(os.getpid())]
    servers = [
        subprocess.Popen(child_argv + ["--fd", str(sock.fileno())], pass_fds=(sock.fileno(),))
        for sock in listeners
    ]
    for sock in set(listeners):
        sock.close()  # the API servers hold them now
    log.info("serving on %s:%d with %d API server processes in front of one engine core", args.host, args.port, count)

    stopping = False

    def stop_serving(signum, frame):
        nonlocal stopping
        stopping = True
        for p in servers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # each drains its in-flight requests, then exits 0

    signal.signal(signal.SIGTERM, stop_serving)
    signal.signal(signal.SIGINT, stop_serving)
    status = 0
    try:
        while any(p.poll() is None for p in servers):
            if core.poll() is not None:
                # The API servers see it too: they fail their requests and exit 1 on their own.
                print(f"herd: error: the engine-core process died (exit status {core.returncode})", file=sys.stderr)
                status = 1
                _wait_or_kill(servers, STOP_TIMEOUT_S)
                break
            failed = [p for p in servers if p.poll() not in (None, 0)]
            if failed and not stopping:
                print(f"herd: error: an API server process exited with status {failed[0].returncode}; stopping",
                      file=sys.stderr)
                status = 1
                stop_serving(None, None)
            time.sleep(POLL_S)
        if any(p.returncode != 0 for p in servers):
            status = 1
    finally:
        _wait_or_kill(servers, args.shutdown_timeout + STOP_TIMEOUT_S)
        _stop(core)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return status


def attach_to_supervisor(supervisor_pid: int) -> None:
    """An API server dies with the supervisor that started it."""
    from herd.engine.core import _die_with_parent

    if not pid_alive(supervisor_pid):
        os._exit(1)
    _die_with_parent(supervisor_pid)


def _listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One socket per API server, all bound to the port with SO_REUSEPORT, so the kernel spreads
    new connections evenly over them; one shared socket where SO_REUSEPORT does not exist."""
    if not hasattr(socket, "SO_REUSEPORT"):
        shared = socket.create_server((host, port), backlog=2048)
        return [shared] * count
    sockets = []
    for _ in range(count):
        sock = socket.create_server((host, port), reuse_port=True, backlog=2048)
        if port == 0:  # the first one picked the port; the others join it
            port = sock.getsockname()[1]
        sockets.append(sock)
    return sockets


def _without(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


def _wait_or_kill(processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _stop(core: subprocess.Popen) -> None:
    # Its API servers are gone and nothing is in flight: nothing in it is worth a clean exit.
    if core.poll() is None:
        core.kill()
    core.wait(10)
