"""ServerConfig validation: every problem reported at once."""

import pytest
import torch

from server.config import ServerConfig, ServerConfigError


def test_defaults_are_valid():
    assert ServerConfig().torch_dtype == torch.float32


def test_every_error_is_listed():
    with pytest.raises(ServerConfigError) as e:
        ServerConfig(n_slots=2, max_running=0, dtype="int8", device="nowhere", max_rank=0, kv_dtype="fp8")
    message = str(e.value)
    for field in ("n_slots", "max_running", "dtype", "device", "max_rank", "kv_dtype"):
        assert field in message


def test_upload_limit_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv("MHR_MAX_UPLOAD_MB", "0.5")
    assert ServerConfig.load().max_upload_bytes == 512 * 1024
    with pytest.raises(ServerConfigError, match="max_upload_mb"):
        ServerConfig(max_upload_mb=0)
