"""Models by Hugging Face Hub id, resolved offline from a cache laid out exactly as
huggingface_hub lays it out (refs/, snapshots/, blobs/), and the errors when it is not there."""

import hashlib
import os
from pathlib import Path

import pytest

from herd.model_source import HERD_FILES, ModelNotFoundError, is_hub_id, resolve_model_dir, served_name

REPO = "testorg/tiny-llama4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """models--org--name/{refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>, blobs/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(demo_dir, tmp_path_factory):
    import json

    cache = tmp_path_factory.mktemp("hf-cache")
    # The demo, with an attention chunk (60) that the default block size (16) does not divide.
    config = json.loads((demo_dir / "config.json").read_text())
    config["text_config"]["attention_chunk_size"] = 60
    (cache / "config.json").write_text(json.dumps(config))
    files = {f.name: f for f in demo_dir.iterdir()} | {"config.json": cache / "config.json"}
    snapshot = lay_out_hub_cache(cache, REPO, files)
    return cache, snapshot


def test_hub_ids_and_paths():
    assert is_hub_id("meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8") and is_hub_id("gpt2")
    assert not any(map(is_hub_id, ["./model", "/abs/model", "a/b/c", "~/m", "bad name/x"]))


def test_resolved_offline_from_the_cache(hub_cache, monkeypatch):
    cache, snapshot = hub_cache
    assert resolve_model_dir(REPO, download_dir=cache) == snapshot
    assert resolve_model_dir(REPO, download_dir=cache, revision=COMMIT) == snapshot
    # The default cache is huggingface_hub's (HF_HOME / HF_HUB_CACHE).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir(REPO) == snapshot
    assert served_name(REPO, snapshot) == REPO


def test_missing_model_offline_names_the_id_and_the_cache(hub_cache, tmp_path):
    cache, _ = hub_cache
    with pytest.raises(ModelNotFoundError) as missing:
        resolve_model_dir("testorg/not-there", download_dir=cache)
    message = str(missing.value)
    assert "testorg/not-there" in message and str(cache) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelNotFoundError, match="at revision v9"):
        resolve_model_dir(REPO, download_dir=cache, revision="v9")


def test_a_local_directory_wins_over_an_id(hub_cache, tmp_path, monkeypatch):
    cache, _ = hub_cache
    local = tmp_path / REPO
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(REPO, download_dir=cache) == Path(REPO)
    assert served_name(REPO, Path(REPO)) == "tiny-llama4"


def test_only_what_herd_reads_is_downloaded():
    from huggingface_hub.utils import filter_repo_objects

    maverick = [
        "config.json", "generation_config.json", "model-00001-of-00084.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "chat_template.json", "preprocessor_config.json", "processor_config.json",
        "README.md", "LICENSE", ".gitattributes", "original/consolidated.00.pth", "original/params.json",
        "original/tokenizer.model", "pytorch_model-00001.bin",
    ]
    chosen = set(filter_repo_objects(maverick, allow_patterns=HERD_FILES))
    assert chosen == set(maverick[:10])


def test_cli_error_without_traceback(hub_cache, capsys):
    from herd.cli import main

    cache, _ = hub_cache
    assert main(["serve", "testorg/not-there", "--no-platform", "--download-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error: testorg/not-there") and str(cache) in err and "Traceback" not in err


def test_llm_by_hub_id(hub_cache, demo_dir):
    from herd import LLM, SamplingParams

    cache, snapshot = hub_cache
    llm = LLM(REPO, download_dir=cache, dtype="float32", device="cpu", max_model_len=256)
    assert llm.model_dir == snapshot
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert len(llm.generate("Hello", greedy)[0].outputs[0].token_ids) == 4


def test_serve_by_hub_id_answers_to_the_id(hub_cache, tmp_path):
    """`herd serve org/name` with the cache in HF_HUB_CACHE, offline: served as "org/name"."""
    import subprocess
    import sys
    import time

    import httpx

    from tests.server.test_serve import _free_port

    cache, _ = hub_cache
    port = _free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "herd.cli", "serve", REPO, "--port", str(port), "--no-platform", "--dtype", "float32",
           "--max-model-len", "256", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # an engine core process starts under a loaded CI
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [REPO]
        body = {"model": REPO, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        proc.kill()
        proc.wait()
    log = proc.stdout.read()
    assert "block size 15" in log and f"serving {REPO}" in log  # the start-up log says what it chose
