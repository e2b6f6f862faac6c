"""Where a model's files come from: a local directory, herd's built-in models, or the Hugging Face Hub.

A Hub id (`meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8`) resolves as vLLM resolves it,
through huggingface_hub: from the shared Hugging Face cache when the files are there (a user who
ran `hf download` gets no second copy), otherwise by downloading only the files herd reads, with
huggingface_hub's progress bars. HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE work as
they do for every Hugging Face tool. A local directory of the same name always wins.
"""

from __future__ import annotations

from pathlib import Path

# Everything herd reads from a checkpoint (weights, configs, tokenizer, chat template,
# image processor); other files in a repository (original/ consolidated weights, READMEs,
# .bin / .pth duplicates) are never downloaded.
HERD_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
]


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local checkpoint nor available from the Hub (or its cache)."""


def is_hub_id(model: str) -> bool:
    """`org/name` or `name` as the Hub spells repository ids (not a path that merely does not exist)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def hub_cache_dir(download_dir: str | Path | None = None) -> Path:
    from huggingface_hub import constants

    return Path(download_dir) if download_dir is not None else Path(constants.HF_HUB_CACHE)


def download_from_hub(repo_id: str, *, revision: str | None = None, download_dir: str | Path | None = None) -> Path:
    """The snapshot directory of `repo_id` in the Hugging Face cache, fetching what herd reads."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir(download_dir)
    at = f" at revision {revision}" if revision else ""
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=download_dir, allow_patterns=HERD_FILES)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is a gated model on the Hugging Face Hub: accept its licence on huggingface.co "
            "and set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id} is neither a local directory nor a model on the Hugging Face Hub "
            "(for a private model, set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the Hub could not be reached"
        raise ModelNotFoundError(
            f"{repo_id}{at} is not in the Hugging Face cache at {cache}{offline}: download it with "
            f"`hf download {repo_id}` while online, or pass a local checkpoint directory"
        ) from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{repo_id}{at} has no config.json (in {path}): not a checkpoint herd can load")
    return path


def resolve_model_dir(
    model: str | Path | None, *, revision: str | None = None, download_dir: str | Path | None = None
) -> Path:
    """A checkpoint directory. None -> the default model (SmolLM2-135M-Instruct converted to a
    Llama 4 text checkpoint, made once in herd's cache); "demo" -> the random-weight demo; an
    existing directory -> itself; otherwise a Hugging Face Hub id."""
    from herd.demo import DEMO_NAME, ensure_demo_model

    if model is None:
        from herd.default_model import ensure_default_model

        return ensure_default_model()
    if str(model) == DEMO_NAME:
        return ensure_demo_model()
    path = Path(model).expanduser()
    if path.is_dir() or not is_hub_id(str(model)):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a checkpoint directory (no config.json)")
        return path
    return download_from_hub(str(model), revision=revision, download_dir=download_dir)


def served_name(model: str | Path | None, model_dir: Path) -> str:
    """The name clients use by default: the Hub id for a Hub model (as vLLM), else the directory's name."""
    if model is not None and not Path(model).expanduser().is_dir() and is_hub_id(str(model)):
        return str(model)
    return model_dir.name
