"""Issue 22, finding 5: settings a user would be surprised to see accepted, and what other writers of
the pool's registry can put on an operator's terminal."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from broker.pool import _load
from common.settings import ConfigError, Settings, load_settings
from specd.pool import printable


@pytest.mark.parametrize("sections", [
    {"tenants": {"names": ["acme.eu"]}},
    {"tenants": {"overrides": {"acme.eu": {"max_sessions": 1}}}},
    {"pool": {"lease_ms": 10**12}},
    {"verifier": {"worker_id": "v 1{x}\n"}},
    {"edge": {"worker_id": "e\x1b[2J"}},
    {"redis": {"url": "redis+cluster://"}},
    {"redis": {"url": "redis+cluster://:7000"}},
])
def test_invalid_settings_are_refused_naming_them(sections) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**sections)
    section, key = next(iter(sections.items()))
    assert f"{section}.{next(iter(key))}" in str(refused.value)


def test_a_quoted_number_in_the_settings_file_is_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "settings.toml"
    path.write_text('[pool]\nlease_ms = "3000"\n[edge]\ngamma = "4"\n')
    monkeypatch.setenv("SPECD_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"\[pool\] lease_ms = '3000', \[edge\] gamma = '4'"):
        load_settings()
    monkeypatch.setenv("SPECD_POOL__LEASE_MS", "3000")  # the environment has only strings: fine
    path.write_text("[pool]\nlease_ms = 3000\n")
    assert load_settings().pool.lease_ms == 3000


def test_a_cluster_url_with_hosts_is_accepted() -> None:
    assert Settings(redis={"url": "redis+cluster://a:7000,b:7001"}).redis.url.endswith("b:7001")


def test_terminal_escapes_from_the_workers_hash_are_shown_escaped() -> None:
    assert printable("v1\x1b[2J\x07") == "v1\\x1b[2J\\x07"
    assert _load(json.dumps({"sessions": "\x1b[2J", "at": 1})) == {"at": 0.0}  # stale: pruned
    assert _load(b"not json") == {"at": 0.0}
    assert _load(json.dumps({"sessions": 2, "at": 5, "tenants": {"a": 1}}))["sessions"] == 2
