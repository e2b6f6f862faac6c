"""herd.model and herd.engine (and the CLI, until `serve` runs) import with torch alone."""

import subprocess
import sys


def test_engine_and_model_do_not_import_the_server_stack():
    code = (
        "import sys, herd, herd.engine.engine, herd.model, herd.cli\n"
        "bad = [m for m in ('fastapi', 'pydantic', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
