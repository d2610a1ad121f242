"""Upload a finished latentkv output folder to the Hugging Face Hub.

The token comes from the argument or huggingface_hub's usual places (HF_TOKEN, `hf auth login`);
it is never printed, logged, or put into an error message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from latentkv.errors import LatentKVError, installed_exceptions
from latentkv.io.card import redact_secrets

logger = logging.getLogger(__name__)

_LOGIN_HINT = "run `hf auth login` or set HF_TOKEN (a token with write access)"


def _check_finished(folder: Path) -> None:
    """Refuse anything but a complete output: config, weights, and no temp-folder leftovers."""
    if not folder.is_dir():
        raise LatentKVError(f"{folder} is not a folder; pass the output folder of a finished latentkv run.")
    if ".partial" in folder.name or folder.name.startswith("."):
        raise LatentKVError(
            f"{folder} is an unfinished temporary folder of an interrupted run; run the command again to completion "
            "and push its output folder."
        )
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        missing.append("model.safetensors (or model.safetensors.index.json)")
    if missing:
        raise LatentKVError(
            f"{folder} is not a finished latentkv output (missing {', '.join(missing)}); run the conversion to "
            "completion and push its --output folder."
        )
    from latentkv.modeling import check_self_contained

    check_self_contained(folder)  # what is pushed must load on its own
    leftovers = [p.name for p in folder.iterdir() if ".partial" in p.name]
    if leftovers:
        raise LatentKVError(
            f"{folder} holds unfinished files ({', '.join(sorted(leftovers)[:3])}); rerun the command with --overwrite."
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LatentKVError(f"{index} is unreadable ({exc}); rerun the command with --overwrite.") from exc
        from latentkv.io.lazy import check_shard_name

        for shard in shards:
            check_shard_name(index, str(shard))
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise LatentKVError(
                f"{folder} lacks shard {absent[0]} named by its index; rerun the command with --overwrite."
            )


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, before anything is uploaded."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise LatentKVError(f"{repo_id!r} is not a Hub repo id; use OWNER/NAME, e.g. user/model-mla")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LatentKVError(f"{repo_id!r} is not a valid Hub repo id ({first}); use OWNER/NAME with letters, digits, "
                            "'-', '_' and '.'") from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP client huggingface_hub uses."""
    from huggingface_hub import errors as hf_errors

    types: list[type[BaseException]] = [hf_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError]
    types += installed_exceptions((("requests", "ConnectionError"), ("requests", "Timeout"),
                                   ("httpx", "TransportError"), ("httpx2", "TransportError")))
    return tuple(types)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> str:
    """Create (or reuse) the model repo `repo_id` and upload `folder` to it; return the repo's URL.

    With `revision`, the branch is created if needed and the upload goes there.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    _check_finished(folder)
    api = HfApi(token=token) if token else HfApi()
    where = f"{repo_id}@{revision}" if revision else repo_id

    def fail(exc: BaseException) -> LatentKVError:
        # Every message is redacted: a token may hide in a URL or a server echo.
        reason = redact_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else "", token)
        if isinstance(exc, _network_errors()):
            return LatentKVError(
                f"Could not reach the Hugging Face Hub to push {where} ({type(exc).__name__}: {reason}); "
                "check your connection; the folder is unchanged."
            )
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, hf_errors.LocalTokenNotFoundError) or status in (401, 403):
            return LatentKVError(f"The Hub refused the credentials for pushing {where}; {_LOGIN_HINT}.")
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return LatentKVError(f"Hub repository {repo_id!r} cannot be written with these credentials; {_LOGIN_HINT}.")
        if isinstance(exc, ValueError):  # the Hub client refused an argument: retrying cannot help
            return LatentKVError(f"The Hub client refused to push {folder} to {where} ({reason}); check the repo id "
                                 "and --revision.")
        return LatentKVError(
            f"Pushing {folder} to {where} failed ({type(exc).__name__}: {reason}); the folder is unchanged, "
            "retry the push."
        )

    caught = (hf_errors.HfHubHTTPError, hf_errors.LocalTokenNotFoundError, ValueError, *_network_errors())
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        logger.info("Uploading %s to %s", folder, where)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message="Upload latentkv conversion",
            ignore_patterns=["*.partial*", ".*"],
        )
    except caught as exc:
        raise fail(exc) from None  # `from None`: the original may carry request headers
    url = str(repo_url) if repo_url else f"https://huggingface.co/{repo_id}"
    if revision:
        url = f"{url.rstrip('/')}/tree/{revision}"
    logger.info("Pushed %s to %s", folder, url)
    return url
