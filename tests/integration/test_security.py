"""Redis ACL users and TLS end to end: a verifier and a tenant-scoped edge over rediss:// only.

The certificates (a CA, a server certificate for 127.0.0.1, a client certificate) are made in
the test with the openssl CLI; the ACL file is the per-tenant layout of docs/security.md.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from broker.acl import edge_rule, verifier_rule
from broker.streams import BrokerError, connect
from common.sampling import SamplingParams
from common.settings import ConfigError, Settings, load_settings
from common.wire import SamplingSpec
from specd.runtime import build_edge, build_verifier, make_broker
from specd.workers import check_health
from verifier_worker.engine import generate_target_only

PREFIX = "sec"
ACL = "\n".join([  # the rules `specd acl` prints (broker.acl), as an ACL file
    verifier_rule(PREFIX, "verifier-pw"), edge_rule(PREFIX, "acme", "acme-pw"),
    "user admin on >admin-pw ~* &* +@all", "user default off"]) + "\n"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate valid for 127.0.0.1/localhost and a client certificate."""
    _openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=specd-test-ca", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN=specd-{name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *extra, cwd=folder)
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt",
                                             "client.key")}


def _start_tls_redis(folder: Path, certs: dict[str, Path]) -> tuple[subprocess.Popen[bytes], int]:
    """Start the TLS-only server; retried on a fresh port, its log quoted when it will not start."""
    from conftest import _free_port, _wait_for_port, redis_server_binary

    log = folder / "redis.log"
    for _attempt in range(3):
        port = _free_port()
        process = subprocess.Popen(
            [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"]),
             "--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "yes",
             "--aclfile", str(folder / "users.acl"), "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(port, timeout=20.0)
            return process, port
        except RuntimeError:
            process.kill()
            process.wait(timeout=10)
    raise RuntimeError(f"TLS redis-server did not start: {log.read_text()[-2000:] if log.exists() else ''}")


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    """redis-server with TLS only (no plain port), client certificates required, ACL users."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder)
    (folder / "users.acl").write_text(ACL)
    process, port = _start_tls_redis(folder, certs)
    try:
        yield f"rediss://127.0.0.1:{port}/0", certs
    finally:
        process.terminate()
        process.wait(timeout=10)


def secure_settings(url: str, certs: dict[str, Path], tiny_pair: dict, user: str, password: str,
                    tenant: str = "default") -> Settings:
    return Settings(
        redis={"url": url, "key_prefix": PREFIX, "username": user, "password": password,
               "tls_ca_file": str(certs["ca.crt"]), "tls_cert_file": str(certs["client.crt"]),
               "tls_key_file": str(certs["client.key"])},
        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
        verifier={"idle_block_ms": 20, "worker_id": "v-sec", "acl_check": "strict"},
        edge={"verdict_timeout_s": 30, "tenant": tenant, "worker_id": f"{tenant}-e1"},
        # Limits that do not bind, so that the tenant-limit scripts run under the verifier's ACL.
        tenants={"overrides": {"acme": {"max_sessions": 8, "draft_tokens_per_s": 10000.0}}})


@pytest.mark.integration
async def test_pipeline_over_tls_with_acl_users(secure_redis, tiny_pair) -> None:
    url, certs = secure_redis
    verifier_settings = secure_settings(url, certs, tiny_pair, "verifier", "verifier-pw")
    edge_settings = secure_settings(url, certs, tiny_pair, "edge-acme", "acme-pw", tenant="acme")
    verifier_broker, edge_broker = make_broker(verifier_settings), make_broker(edge_settings)
    verifier = build_verifier(verifier_settings, verifier_broker)
    stop = asyncio.Event()
    task = asyncio.create_task(verifier.run(stop))
    try:
        edge = build_edge(edge_settings, edge_broker)
        tokenizer = edge.backend.tokenizer
        prompts = ["def add(a, b):", "import os"]
        results = await asyncio.gather(*(edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=12))
                                         for p in prompts))
        for prompt, result in zip(prompts, results, strict=True):
            assert result.session_id.startswith("acme.")
            assert result.token_ids == generate_target_only(
                verifier.engine, tokenizer.encode(prompt), SamplingParams(), frozenset(), 12)
        await edge_broker.heartbeat("edge", "acme-e1", 10, b"{}")  # its own heartbeat key: allowed
        assert await check_health(verifier_settings, "verifier") == 0
        await _assert_tenant_isolation(edge_broker.redis)
    finally:
        stop.set()
        await task
        await verifier_broker.close()
        await edge_broker.close()


async def _assert_tenant_isolation(edge_redis) -> None:
    """The acme edge cannot read or write another tenant's keys, nor read shared streams."""
    with pytest.raises(NoPermissionError):
        await edge_redis.xread({f"{PREFIX}:{{globex.1234}}:verdicts": "0-0"}, count=1)
    with pytest.raises(NoPermissionError):
        await edge_redis.xadd(f"{PREFIX}:{{globex.1234}}:drafts", {b"m": b"x"})
    with pytest.raises(NoPermissionError):
        await edge_redis.xrange(f"{PREFIX}:opens:{{acme}}", count=1)  # its own opens are write-only
    with pytest.raises(NoPermissionError):
        await edge_redis.xadd(f"{PREFIX}:opens:{{globex}}", {b"m": b"x"})  # another tenant's opens
    with pytest.raises(NoPermissionError):
        await edge_redis.xrange(f"{PREFIX}:logs", count=1)
    with pytest.raises(NoPermissionError):
        await edge_redis.set(f"{PREFIX}:health:verifier:fake", b"1")
    with pytest.raises(NoPermissionError):  # no key of another type under its own sessions' names
        await edge_redis.set(f"{PREFIX}:{{acme.1}}:tokens", b"1")
    with pytest.raises((NoPermissionError, ResponseError)):
        await edge_redis.flushall()


@pytest.mark.integration
async def test_wrong_password_and_missing_client_certificate_are_refused(secure_redis, tiny_pair) -> None:
    url, certs = secure_redis
    bad = make_broker(secure_settings(url, certs, tiny_pair, "edge-acme", "wrong"))
    with pytest.raises(AuthenticationError):
        await bad.ping()
    await bad.close()
    no_cert = connect(url, 5, username="admin", password="admin-pw", tls_ca_file=str(certs["ca.crt"]))
    with pytest.raises(redis.exceptions.ConnectionError):
        await no_cert.ping()
    await no_cert.aclose()


def test_tls_settings_need_a_rediss_url() -> None:
    with pytest.raises(ConfigError, match="rediss://"):
        load_settings({"redis": {"url": "redis://localhost:6379", "tls_ca_file": "/ca.crt"}})
    with pytest.raises(ConfigError, match="go together"):
        load_settings({"redis": {"url": "rediss://localhost:6379", "tls_cert_file": "/c.crt"}})
    with pytest.raises(ConfigError, match=r"edge\.tenant"):
        load_settings({"edge": {"tenant": "a.b"}})  # a dot would let tenant "a" match "a.b.*" keys
    with pytest.raises(BrokerError):
        connect("redis://localhost:6379", tls_ca_file="/ca.crt")


def test_tls_client_options_reach_the_connection_pool() -> None:
    client = connect("rediss://localhost:6380/0", 5, username="u", password="p", tls_ca_file="/ca.crt",
                     tls_cert_file="/c.crt", tls_key_file="/c.key")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["username"] == "u" and kwargs["password"] == "p"
    assert kwargs["ssl_ca_certs"] == "/ca.crt" and kwargs["ssl_certfile"] == "/c.crt"
    assert kwargs["ssl_keyfile"] == "/c.key" and kwargs["ssl_cert_reqs"] == "required"
    plain = connect("redis://localhost:6379/0").connection_pool.connection_kwargs
    assert "ssl_ca_certs" not in plain and "username" not in plain


@pytest.mark.integration
async def test_loadtest_against_a_pool_with_acl_users_and_tls(secure_redis, tiny_pair, tmp_path) -> None:
    """`specd loadtest` edges log in as the tenant's ACL user over TLS with a client certificate
    (they used to connect with the URL alone, and a secured pool refused them)."""
    import json
    import os
    import sys

    url, certs = secure_redis
    verifier_settings = secure_settings(url, certs, tiny_pair, "verifier", "verifier-pw")
    verifier_broker = make_broker(verifier_settings)
    stop = asyncio.Event()
    task = asyncio.create_task(build_verifier(verifier_settings, verifier_broker).run(stop))
    edge = secure_settings(url, certs, tiny_pair, "edge-acme", "acme-pw", tenant="acme").redis
    env = {**os.environ, "SPECD_MODELS__TORCH_THREADS": "1", "SPECD_MODELS__TARGET": tiny_pair["target"],
           "SPECD_MODELS__DRAFT": tiny_pair["draft"], "SPECD_REDIS__KEY_PREFIX": PREFIX,
           "SPECD_REDIS__USERNAME": edge.username, "SPECD_REDIS__PASSWORD": edge.password,
           "SPECD_REDIS__TLS_CA_FILE": edge.tls_ca_file, "SPECD_REDIS__TLS_CERT_FILE": edge.tls_cert_file,
           "SPECD_REDIS__TLS_KEY_FILE": edge.tls_key_file, "SPECD_EDGE__TENANT": "acme"}
    report = tmp_path / "report.json"
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "specd", "loadtest", "--redis-url", url, "--no-verifiers", "--edges", "1",
            "--sessions-per-edge", "2", "--backend", "replay", "--max-new-tokens", "8",
            "--prompt", "def add(a, b):", "--report", str(report), "--log-dir", str(tmp_path / "logs"),
            "--no-progress", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
        assert process.returncode == 0, output.decode()[-3000:]
        summary = json.loads(report.read_text())["summary"]
        assert summary["completed_sessions"] == 2 and summary["error_count"] == 0
    finally:
        stop.set()
        await task
        await verifier_broker.close()
