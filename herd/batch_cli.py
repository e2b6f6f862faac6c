"""`herd batch run INPUT.jsonl OUTPUT.jsonl`: a batch file through the engine in this process,
without a server (as `vllm run-batch`). Lines are OpenAI's batch lines (or together's, without
`url`); every line's result goes to OUTPUT in input order, errors included (status_code 4xx/5xx).
The bodies are the server's: each line runs through the same chat/completions code as
`herd serve` (herd/server/batch_offline.py). This module stays light: the CLI imports it on
every start."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="batch_command", metavar="{run}")
    sub.required = True
    r = sub.add_parser("run", help="run a batch input file offline and write the results")
    r.add_argument("input", help="batch input file (.jsonl)")
    r.add_argument("output", help="where the output lines go (.jsonl)")
    r.add_argument("--model", default=None, help="checkpoint directory, or demo (default: the default model)")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--device", default=None)
    r.add_argument("--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"],
                   help="the url of lines that name none (together's form)")
    r.add_argument("--max-model-len", type=int, default=None)
    r.add_argument("--max-num-seqs", type=int, default=64)
    r.add_argument("--max-num-batched-tokens", type=int, default=2048)
    r.add_argument("--kv-cache-tokens", type=int, default=None)
    r.add_argument("--max-in-flight", type=int, default=None, help="lines in the engine at once (default: 2 x --max-num-seqs)")
    r.add_argument("--max-lines", type=int, default=50_000)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from herd.server.batch_offline import run_batch_file

    return run_batch_file(args)
