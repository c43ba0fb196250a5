"""exporters.hub without a network: repo ids, the file list, token handling and error mapping."""

from __future__ import annotations

import pytest

from compressor.errors import UserInputError
from exporters import hub


def test_repo_ids_are_checked():
    assert hub.check_repo_id("me/blip2-opt-2.7b-llm28-q8") == "me/blip2-opt-2.7b-llm28-q8"
    for bad in ("no-namespace", "me/", "me/a b", "a/b/c", "me/..", ""):
        with pytest.raises(UserInputError):
            hub.check_repo_id(bad)


def test_upload_file_list_is_sorted_and_skips_temporaries(tmp_path):
    for rel in ("b.json", "a/model.safetensors", ".tmp-x/half.bin", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert hub.upload_file_list(tmp_path) == ["README.md", "a/model.safetensors", "b.json"]


def test_commit_message_names_recipe_and_hash():
    assert hub.default_commit_message("llm28_q8", "0123456789abcdef" * 4) == "vlm-compress: llm28_q8 (recipe 0123456789ab)"


def test_missing_token_and_offline_mode_are_user_errors(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(hub.HubAuthError, match="no Hugging Face token"):
        hub.resolve_token()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubAuthError, match="HF_HUB_OFFLINE"):
        hub.resolve_token()


def _http_error(status: int, message: str):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    req = httpx2.Request("POST", "http://hub.test/api/repos/create")
    resp = httpx2.Response(status, request=req, json={"error": message})
    return HfHubHTTPError(f"{status} error", response=resp, server_message=message)


@pytest.mark.parametrize(
    "status, cls, words",
    [(401, hub.HubAuthError, "refused the token"), (403, hub.HubAuthError, "may not write"),
     (404, hub.HubAuthError, "not found"), (400, hub.HubAuthError, "rejected"), (500, hub.HubError, "HTTP 500")],
)
def test_http_errors_map_to_one_scrubbed_line(tmp_path, status, cls, words):
    token = "hf_SecretSecretSecret123"
    err = hub._classify(_http_error(status, f"bad {token}"), "me/x", "main", "http://hub.test", tmp_path, token)
    assert type(err) is cls and words in str(err)
    assert token not in str(err) and "\n" not in str(err) and "is kept" in str(err)


def test_connection_errors_are_network_errors(tmp_path):
    err = hub._classify(ConnectionError("Connection refused"), "me/x", "main", "http://hub.test", tmp_path, "t")
    assert isinstance(err, hub.HubNetworkError) and err.exit_code == 3 and "cannot reach the Hub" in str(err)
