"""`herd` command line: serve, generate, chat, demo-model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, Hugging Face Hub id (org/name), or demo "
                        "(default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--revision", default=None, help="the Hub model's branch, tag or commit (default: main)")
    p.add_argument("--download-dir", default=None,
                   help="where Hub models are cached (default: the Hugging Face cache, $HF_HOME/hub)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads on CPU (default: all cores but one, at least one; vLLM's CPU default too)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    # vLLM's spelling wherever vLLM has the option.
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the model (default: the checkpoint directory's name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one engine step")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV-cache block size in tokens (default: 16, or a divisor of the model's attention chunk)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache size in tokens (default: sized for the device)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: K/V stored in E4M3 with scales, about half the memory per token")
    p.add_argument("--quantization", default=None, choices=["fp8", "fp8-all"],
                   help="quantize a bf16 checkpoint to FP8 while loading (fp8: routed experts, as Meta's "
                        "release; fp8-all: every linear layer but router and lm_head). FP8 checkpoints need none")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many devices (GPUs, or CPU processes), one worker process each")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: each device holds whole routed experts instead of a slice of every one")
    p.add_argument("--nnodes", type=int, default=1,
                   help="hosts the model's ranks are spread over (--tensor-parallel-size is the total); every "
                        "node runs the same command with its own --node-rank, only node 0 serves")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, reachable from every node")
    p.add_argument("--master-port", type=int, default=None, help="a free port on node 0 (needed with --nnodes > 1)")
    p.add_argument("--chat-template", default=None, help="a jinja chat template file (default: the checkpoint's)")
    p.add_argument("--limit-mm-per-prompt", default=None, help='e.g. \'{"image": 5}\'')
    p.add_argument("--allow-private-image-urls", action="store_true",
                   help="let image URLs point at private, loopback or link-local hosts (off: SSRF guard)")
    p.add_argument("--price-input", type=float, default=0.0, help="USD per 1M input tokens, shown in /v1/models")
    p.add_argument("--price-output", type=float, default=0.0, help="USD per 1M output tokens, shown in /v1/models")
    p.add_argument("--max-pending-requests", type=int, default=None,
                   help="requests admitted at once (running + queued); more get 503 (default: 4 x --max-num-seqs)")
    p.add_argument("--max-request-body-bytes", type=int, default=32 * 1024 * 1024, help="larger bodies get 413")
    p.add_argument("--allowed-origins", default="", help='CORS origins, e.g. \'["*"]\' (default: no CORS)')
    p.add_argument("--allowed-methods", default='["*"]')
    p.add_argument("--allowed-headers", default='["*"]')
    p.add_argument("--allow-credentials", action="store_true")
    p.add_argument("--api-key", default=None, help="require this one bearer token (or set HERD_API_KEY)")
    p.add_argument("--config", default=None,
                   help="platform configuration (herd.toml: database, prices, rate limits; default: built in)")
    p.add_argument("--require-api-key", action="store_true",
                   help="refuse requests without a key made by `herd keys create` (default: only once a key exists)")
    p.add_argument("--no-platform", action="store_true",
                   help="serve without API keys, rate limits and the usage ledger")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
    p.add_argument("--uvicorn-log-level", default="info")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="HTTP server processes on the one port, in front of one engine core (for when one "
                        "process cannot parse and stream fast enough)")
    # Set by the --api-server-count supervisor for the API servers it starts.
    p.add_argument("--engine-address", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)


def _sampling(args):
    from herd import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_generate(args) -> int:
    from herd import LLM

    llm = LLM(args.model, dtype=args.dtype, device=args.device, revision=args.revision, download_dir=args.download_dir,
              cpu_threads=args.cpu_threads)
    params = _sampling(args)
    if args.raw:
        out = llm.generate(args.prompt, params)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    print(out.outputs[0].text)
    return 0


def cmd_chat(args) -> int:
    """A terminal conversation, streamed: against a running server (--url) or in-process."""
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    reply_to = _chat_over_http(args) if args.url else _chat_in_process(args)
    print("herd chat: an empty line or Ctrl-D ends the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        parts = []
        for piece in reply_to(messages):
            parts.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(parts)})
    return 0


def _chat_in_process(args):
    from herd import LLM

    llm = LLM(args.model, dtype=args.dtype, device=args.device, revision=args.revision, download_dir=args.download_dir,
              cpu_threads=args.cpu_threads)
    params = _sampling(args)
    engine = llm.engine

    def reply(messages):
        ids = llm.tokenizer.apply_chat_template(messages)
        request_id = engine.add_request(ids, params)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.request_id == request_id:
                        yield out.outputs[0].delta_text
                        if out.finished:
                            return
        finally:
            engine.abort(request_id)

    return reply


def _chat_over_http(args):
    import httpx

    base = args.url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(10.0, read=None))
    model = args.served_model_name
    if model is None:
        response = client.get("/models")
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    if args.max_tokens is not None:
        sampling["max_tokens"] = args.max_tokens

    def reply(messages):
        body = {"model": model, "messages": messages, "stream": True, **sampling}
        with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ValueError(f"the server answered {response.status_code}: {response.text}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ValueError(f"the server failed: {chunk['error'].get('message')}")
                for choice in chunk.get("choices", []):
                    yield choice.get("delta", {}).get("content") or ""

    return reply


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from herd.server import ServerOptions, create_app
    except ImportError as e:
        print(f"herd serve needs the server packages ({e.name}): pip install herd", file=sys.stderr)
        return 2
    from herd.engine.client import EngineClient, EngineStartError

    if _hosts_ranks_only(args):
        return _serve_headless(args, _parallel_options(args))
    platform = None
    if not args.no_platform:
        from herd.platform.config import load_config as load_platform_config
        from herd.platform.service import Platform

        platform = Platform(load_platform_config(args.config), require_api_key=True if args.require_api_key else None)
        if args.engine_address is not None:
            # One of --api-server-count processes: the supervisor already closed the rows a
            # crash left running; here they may be a sibling's requests in flight.
            platform.recover_on_start = False
    from herd.config import load_config
    from herd.model_source import resolve_model_dir, served_name
    from herd.engine.options import check_before_loading, check_image_limits

    # Every option is read and checked against the model's config before any weight is loaded.
    limits = _parse_limits(args.limit_mm_per_prompt)
    server_options = dict(
        chat_template=_read_template(args.chat_template),
        limit_mm_per_prompt=limits,
        max_pending_requests=args.max_pending_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        allowed_origins=_json_list(args.allowed_origins),
        allowed_methods=_json_list(args.allowed_methods),
        allowed_headers=_json_list(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        api_key=args.api_key or os.environ.get("HERD_API_KEY") or None,
        allow_private_image_urls=args.allow_private_image_urls,
    )
    model = args.model_dir or args.model
    model_dir = resolve_model_dir(model, revision=args.revision, download_dir=args.download_dir)
    config = load_config(model_dir)
    check_image_limits(limits, config, explicit=args.limit_mm_per_prompt is not None)
    check_before_loading(model_dir, config, _engine_options(args), args.dtype)  # before the engine core starts
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be at least 1, got {args.api_server_count}")
    if args.api_server_count > 1 and args.engine_address is None:
        from herd.server.processes import serve_many

        if platform is not None:
            platform.start()  # once, before any API server serves
            platform.close()
        argv = args.argv[args.argv.index("serve") + 1 :]
        return serve_many(args, argv, model_dir, _engine_options(args))
    server = None
    core_died = threading.Event()

    def on_core_death(reason: str) -> None:
        # Every request in flight has its error already; let them go out, then stop serving so
        # that a supervisor restarts the whole server (the exit status says it failed).
        core_died.set()
        print(f"herd: error: {reason}; shutting down", file=sys.stderr)
        threading.Timer(0.5, lambda: server is not None and setattr(server, "should_exit", True)).start()

    try:
        if args.engine_address is not None:  # one of several API servers in front of a shared core
            from herd.server.processes import attach_to_supervisor

            attach_to_supervisor(args.supervisor_pid)
            engine = EngineClient(args.engine_address, core_pid=args.engine_pid, on_death=on_core_death)
        else:
            engine = EngineClient.start(model_dir, dtype=args.dtype, device=args.device, on_death=on_core_death,
                                        **_engine_options(args))
    except EngineStartError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 1
    names = args.served_model_name or [served_name(model, model_dir)]  # a Hub model is served by its id
    price_input, price_output = args.price_input, args.price_output
    if platform is not None and not (price_input or price_output):
        # /v1/models shows what the ledger bills.
        price = platform.config.price_for(names[0])
        price_input, price_output = price.input, price.output
    options = ServerOptions(
        served_model_names=names,
        price_input=price_input,
        price_output=price_output,
        **server_options,
    )
    app = create_app(engine, options, platform=platform)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        timeout_keep_alive=5,
    )
    # SIGTERM / Ctrl-C: uvicorn stops accepting, lets in-flight requests finish for up to
    # --shutdown-timeout seconds, cancels the rest (aborting them in the engine), then the app
    # shuts the engine down.
    server = _graceful_server(config)
    try:
        if args.fd is not None:  # the listening socket the supervisor opened, shared by its API servers
            import socket

            server.run(sockets=[socket.socket(fileno=args.fd)])
        else:
            server.run()
    finally:
        engine.shutdown()
    return 1 if core_died.is_set() else 0


def _engine_options(args) -> dict:
    """The engine's options from the command line, passed on untouched to the engine core."""
    return dict(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_tokens=args.kv_cache_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        cpu_threads=args.cpu_threads,
        **_parallel_options(args),
    )


def _parallel_options(args) -> dict:
    return dict(
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


def _hosts_ranks_only(args) -> bool:
    """Nodes other than node 0 (and torchrun processes other than rank 0) host model ranks and
    serve nothing."""
    if args.node_rank:
        return True
    from herd.parallel.nodes import under_torchrun

    return under_torchrun() and int(os.environ.get("RANK", "0")) != 0


def _serve_headless(args, parallel: dict) -> int:
    import torch

    from herd.config import load_config
    from herd.engine.engine import resolve_dtype
    from herd.engine.options import check_quantization, engine_options_from, resolve_engine_options
    from herd.model_source import resolve_model_dir
    from herd.parallel.executor import run_headless

    model_dir = resolve_model_dir(args.model_dir or args.model, revision=args.revision, download_dir=args.download_dir)
    config = load_config(model_dir)
    options = resolve_engine_options(engine_options_from(parallel), config)
    check_quantization(config, args.quantization)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, config, device)
    return run_headless(model_dir, config, dtype, device, args.quantization, options)


def _graceful_server(config):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die
        of the signal; a clean drain is a normal exit (status 0) for supervisors."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if captured and captured[-1] == sig:
                captured.pop()

    return GracefulServer(config)


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template: {value} is neither a file nor a template")


def _parse_limits(value: str | None) -> dict[str, int]:
    """vLLM's spelling: '{"image": 5}' or image=5,video=0."""
    if not value:
        return {"image": 5}
    try:
        limits = json.loads(value) if value.lstrip().startswith("{") else dict(
            item.split("=", 1) for item in value.split(",")
        )
        return {str(k): int(v) for k, v in limits.items()}
    except (ValueError, TypeError):
        raise ValueError(f"--limit-mm-per-prompt: cannot read {value!r}; use '{{\"image\": 5}}'") from None


def _json_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return [str(v) for v in json.loads(value)]
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_demo_model(args) -> int:
    from herd.demo import write_demo_model

    path = write_demo_model(args.out_dir)
    print(f"wrote the demo checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Llama 4 inference server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a reply to one prompt and print it")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the OpenAI- and Together-compatible HTTP API")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="checkpoint directory, Hugging Face Hub id (org/name), or demo "
                        "(default: SmolLM2-135M-Instruct, converted once)")
    _add_model_args(p)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat in the terminal (in-process, or with a running server via --url)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000 (default: in-process)")
    p.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"), help="the server's API key, if it has one")
    p.add_argument("--served-model-name", default=None, help="the model to ask for (default: the server's first)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo-model", help="write the tiny random-weight demo checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_demo_model)

    from herd.platform import commands as platform_commands  # `herd keys ...`, `herd usage`

    platform_commands.add_arguments(sub)

    # Subcommands whose code lives with what they serve: each module gives add_arguments/run.
    for name, module, help_text in (
        ("plan", "herd.plan", "KV-cache memory per token and the longest context a budget admits"),
        ("convert-gguf", "herd.gguf", "convert a dense Llama GGUF file into a Llama 4 text checkpoint"),
        ("batch", "herd.batch_cli", "run a batch file (OpenAI batch lines) offline: herd batch run IN.jsonl OUT.jsonl"),
    ):
        p = sub.add_parser(name, help=help_text)
        _lazy(module).add_arguments(p)
        p.set_defaults(func=lambda args, module=module: _lazy(module).run(args))
    return parser


def _lazy(module: str):
    import importlib

    return importlib.import_module(module)


def _show_herd_logs() -> None:
    """herd's own start-up messages (model served, block size chosen, FP8 layout) on stderr, in
    uvicorn's style; without a handler Python would drop everything below a warning."""
    import logging

    logger = logging.getLogger("herd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "generate", "chat"):
        _show_herd_logs()
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
