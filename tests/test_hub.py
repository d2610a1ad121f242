"""latentkv.hub.push_folder: refuses unfinished outputs, maps network / auth failures, hides the token."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub import errors as hf_errors

from latentkv.errors import LatentKVError
from latentkv.hub import push_folder

FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcd"


@pytest.fixture
def finished(tmp_path) -> Path:
    """A minimal finished output folder: config, weights, card."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "README.md").write_text("card")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _forbid_network(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("push_folder must not touch the Hub for an unfinished folder")

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, boom)


def _http_error(status: int) -> hf_errors.HfHubHTTPError:
    import httpx2

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return hf_errors.HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError(f"Failed to connect (Authorization: Bearer {FAKE_TOKEN})"),
        hf_errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
        "requests",
        "httpx2",
    ],
)
def test_push_unreachable_is_clear_and_hides_token(finished, monkeypatch, capsys, caplog, error):
    """Guards against a raw network traceback on push, and against the token leaking into output."""
    if error == "requests":
        import requests

        error = requests.ConnectionError(f"HTTPSConnectionPool: token={FAKE_TOKEN}")
    elif error == "httpx2":
        httpx2 = pytest.importorskip("httpx2")
        error = httpx2.ConnectError(f"[Errno -3] Temporary failure in name resolution {FAKE_TOKEN}")

    def unreachable(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    monkeypatch.setattr(HfApi, "upload_folder", unreachable)
    before = _digest(finished)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(LatentKVError) as info:
            push_folder(finished, "user/model", token=FAKE_TOKEN)
    msg = str(info.value)
    assert "Could not reach the Hugging Face Hub" in msg and "check your connection; the folder is unchanged" in msg
    out = capsys.readouterr()
    for text in (msg, out.out, out.err, caplog.text, repr(info.value.__cause__)):
        assert FAKE_TOKEN not in text
    assert _digest(finished) == before


@pytest.mark.parametrize("status", [401, 403])
def test_push_auth_failure_says_how_to_log_in(finished, monkeypatch, status):
    """Guards against an auth failure not telling the user to log in."""

    def refused(self, *args, **kwargs):
        raise _http_error(status)

    monkeypatch.setattr(HfApi, "create_repo", refused)
    with pytest.raises(LatentKVError, match=r"hf auth login.*HF_TOKEN") as info:
        push_folder(finished, "user/model", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(info.value)


def test_push_success_calls_hub_with_branch(finished, monkeypatch):
    """Guards against the branch not being created / used, or the wrong folder being uploaded."""
    calls: list[tuple[str, tuple, dict]] = []

    def record(name, result=None):
        def fn(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return fn

    monkeypatch.setattr(HfApi, "create_repo", record("create_repo", "https://huggingface.co/user/model"))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder"))
    url = push_folder(finished, "user/model", private=True, revision="mla-r256", token=FAKE_TOKEN)
    assert url == "https://huggingface.co/user/model/tree/mla-r256"
    names = [c[0] for c in calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True and calls[0][2]["repo_type"] == "model"
    assert calls[1][2]["branch"] == "mla-r256"
    assert calls[2][2]["folder_path"] == str(finished) and calls[2][2]["revision"] == "mla-r256"


def test_push_refuses_unfinished_folder(tmp_path, finished, monkeypatch):
    """Guards against uploading a half-written or wrong folder to a public repo."""
    _forbid_network(monkeypatch)
    partial = tmp_path / ".out.partial-abc123"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors").write_bytes(b"")
    with pytest.raises(LatentKVError, match="unfinished"):
        push_folder(partial, "user/model")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(LatentKVError, match="not a finished latentkv output.*model.safetensors"):
        push_folder(no_weights, "user/model")

    (finished / "config.json").unlink()
    with pytest.raises(LatentKVError, match="missing config.json"):
        push_folder(finished, "user/model")

    with pytest.raises(LatentKVError, match="not a folder"):
        push_folder(tmp_path / "absent", "user/model")


def test_hub_import_does_not_import_torch():
    """Guards against `latentkv.hub` (used by a quick `latentkv push`) pulling in torch at import."""
    code = "import sys, latentkv.hub; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
