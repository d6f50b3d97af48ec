"""The verifier's start-up check that its Redis ACL is no wider than it needs.

Probes that change nothing: a read of a key outside the prefix (EXISTS) and an administrative
read (CONFIG GET). A verifier that may run either could also, when compromised or misconfigured,
read other deployments' keys or reconfigure Redis; and a Redis whose default user is open lets
any client read prompts and forge verdicts (docs/security.md). ``verifier.acl_check``: ``warn``
logs what is too wide, ``strict`` refuses to start, ``off`` skips the probes.
"""

from __future__ import annotations

from redis.exceptions import NoPermissionError, ResponseError

from broker.streams import Broker
from common.logs import get_logger

log = get_logger("specd.verifier")


class AclTooWide(Exception):
    """The verifier's Redis user may do more than a verifier needs (``verifier.acl_check = strict``)."""


async def acl_findings(broker: Broker) -> list[str]:
    """What this connection may do beyond a verifier's needs (empty: nothing)."""
    redis, prefix = broker.redis, broker.keys.prefix
    findings = []
    try:
        await redis.exists(f"{prefix}-acl-probe")
        findings.append(f"it may read keys outside {prefix}:*")
    except NoPermissionError:
        pass
    try:
        await redis.config_get("maxmemory")
        findings.append("it may run administrative commands (CONFIG)")
    except (NoPermissionError, ResponseError):
        pass
    return findings


async def check_acl(broker: Broker, mode: str) -> list[str]:
    if mode == "off":
        return []
    try:
        user = (await broker.redis.execute_command("ACL", "WHOAMI")).decode()
    except (NoPermissionError, ResponseError):
        user = "?"
    findings = await acl_findings(broker)
    if findings:
        problem = (f"the verifier's Redis user {user!r} is wider than it needs: {'; '.join(findings)}. "
                   "Run `specd acl` for the per-tenant rules (docs/security.md)")
        if mode == "strict":
            raise AclTooWide(problem)
        log.warning("verifier.acl_too_wide", user=user, findings=findings, hint="specd acl")
    else:
        log.info("verifier.acl_ok", user=user)
    return findings
