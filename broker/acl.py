"""Redis ACL rules per role and tenant, from the key layout of broker.streams (one place names keys).

Roles:

* ``edge`` of tenant T: adds opens to T's own open stream only (write-only: it cannot read other
  sessions' prompts there), XADD/XREAD/EXPIRE/EXISTS on T's sessions' keys (``{T.*}``), its own
  heartbeat. Never SET/HSET/DEL on session keys: an edge can create only streams there, so it
  cannot plant a key of another type under a verifier's commands. No access to the log stream.
* ``verifier``: every key under the prefix, no pub/sub channel, no ``@dangerous``/``@admin``
  command; the scripts' commands (Redis checks a script's commands against the caller's ACL).
* ``ops``: reads the log stream and the heartbeats (``specd logs``, health checks), pool status.

Passwords are placeholders (``>PASSWORD``) unless given: set them with ``ACL SETUSER`` or an
ACL file (docs/security.md).
"""

from __future__ import annotations

from broker.streams import Keys

VERIFIER_COMMANDS = (
    "+@connection -@dangerous +xreadgroup +xread +xadd +xack +xdel +xautoclaim +xpending +xgroup|create "
    "+xlen +xinfo|groups +xrange +get +set +del +exists +expire +pexpire +strlen +append +hset +hget "
    "+hgetall +type +ttl "
    "+hdel +hmget +hexists +hincrby +zadd +zrem +zrangebyscore +zremrangebyscore +zcard +zscore +zrange "
    "+scan +multi +exec +discard +evalsha +eval +script|load +script|exists +time +ping +info +acl|whoami"
)
EDGE_COMMANDS = "+xadd +xread +expire +exists +ping +hello +auth +client|setname"
OPS_COMMANDS = ("+xrange +xrevrange +xread +xlen +xinfo|groups +exists +get +hgetall +zcard +zrangebyscore "
                "+scan +ping +hello +auth +info")


def edge_user(tenant: str) -> str:
    return f"edge-{tenant}"


def verifier_rule(prefix: str, password: str = "PASSWORD", user: str = "verifier") -> str:
    return f"user {user} on >{password} resetkeys resetchannels ~{prefix}:* -@all {VERIFIER_COMMANDS}"


def edge_rule(prefix: str, tenant: str, password: str = "PASSWORD") -> str:
    keys = Keys(prefix)
    return (f"user {edge_user(tenant)} on >{password} resetkeys resetchannels -@all "
            f"~{prefix}:{{{tenant}.*}}:* %W~{keys.opens(tenant)} {EDGE_COMMANDS} "
            f"(~{keys.health('edge', tenant + '-*')} +set +del +exists)")


def ops_rule(prefix: str, password: str = "PASSWORD", user: str = "ops") -> str:
    return (f"user {user} on >{password} resetkeys resetchannels -@all %R~{prefix}:* {OPS_COMMANDS}")


def rules(prefix: str, tenants: list[str], roles: list[str],
          passwords: dict[str, str] | None = None) -> list[str]:
    """ACL file lines for the roles (``edge`` once per tenant), ``default`` switched off first."""
    passwords = passwords or {}
    lines = ["user default off"]
    if "verifier" in roles:
        lines.append(verifier_rule(prefix, passwords.get("verifier", "PASSWORD")))
    if "edge" in roles:
        lines += [edge_rule(prefix, t, passwords.get(edge_user(t), "PASSWORD")) for t in tenants]
    if "ops" in roles:
        lines.append(ops_rule(prefix, passwords.get("ops", "PASSWORD")))
    return lines
