"""`herd batch run IN OUT`: the engine in-process, no server; output lines in input order, every
custom_id once, bodies equal to what `herd serve` answers, errors as their status codes."""

from __future__ import annotations

import json

import httpx

from herd.cli import main
from tests.server.conftest import make_server


def test_batch_run_offline_matches_the_server(engine, demo_dir, tmp_path):
    chat = {"model": "demo", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5, "temperature": 0}
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "b", "body": {**chat, "messages": [{"role": "user", "content": "Bye"}]}},  # together's form
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"model": "demo", "prompt": "Once upon", "max_tokens": 3, "temperature": 0}},
        {"custom_id": "d", "body": {**chat, "max_tokens": 0}},  # a 400 in the output, not a crash
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["batch", "run", str(src), str(out), "--model", str(demo_dir), "--dtype", "float32",
                 "--no-progress"]) == 0
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["a", "b", "c", "d"]
    assert [r["response"]["status_code"] for r in results] == [200, 200, 200, 400]
    assert results[3]["response"]["body"]["error"]["param"] == "max_tokens"
    with make_server(engine, served_model_names=["demo"]) as url:
        for line, result in zip(lines[:3], results):
            path = line.get("url", "/v1/chat/completions")
            online = httpx.post(url + path, json=line["body"], timeout=60).json()
            got = result["response"]["body"]
            assert got["choices"] == online["choices"]
            assert got["usage"]["completion_tokens"] == online["usage"]["completion_tokens"]


def test_batch_run_refuses_an_invalid_file(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"custom_id": "a", "body": {}}\n{"custom_id": "a", "body": {}}\nnot json\n')
    assert main(["batch", "run", str(src), str(tmp_path / "out.jsonl"), "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert "line 2: duplicate_custom_id" in err and "line 3: invalid_json_line" in err
    assert not (tmp_path / "out.jsonl").exists()
