"""`specd acl`: print the Redis ACL rules of each role, one edge user per tenant.

The rules come from broker.acl (built from the key layout of broker.streams), so they always
match the keys the code uses. Tenants are those named with ``--tenant``, else the configured
ones (``default``, ``tenants.names`` and ``tenants.overrides``). Passwords are the placeholder
``PASSWORD`` unless ``--random-passwords`` is given (then each user gets a fresh one, printed in
the rule itself: keep the output secret). Exit codes: 0 printed, 2 a bad tenant name.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from broker.acl import edge_user, rules
from broker.streams import DEFAULT_TENANT, TENANT_PATTERN
from common.settings import Settings
from specd.failures import EPILOG
from specd.flags import HelpFormatter, add_setting_flags

ROLES = ("verifier", "edge", "ops")


def add_parser(commands: Any) -> None:
    acl = commands.add_parser(
        "acl",
        formatter_class=HelpFormatter,
        epilog=EPILOG,
        help="print the Redis ACL rules per role and tenant",
        description="Print ACL file lines (or ACL SETUSER commands) for the verifier, one edge user per "
        "tenant, and ops. A tenant's edge user may only add opens to its own stream and touch its own "
        "sessions' keys; see docs/security.md.",
    )
    acl.add_argument(
        "--tenant",
        dest="acl_tenants",
        action="append",
        help="a tenant (repeatable); default: the configured ones",
    )
    acl.add_argument(
        "--role", dest="acl_roles", action="append", choices=ROLES, help="a role (repeatable); default: all"
    )
    acl.add_argument("--random-passwords", action="store_true", help="a fresh random password per user")
    acl.add_argument(
        "--setuser", action="store_true", help="print ACL SETUSER commands instead of file lines"
    )
    add_setting_flags(acl, "common")
    acl.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    tenants = args.acl_tenants or sorted(
        {DEFAULT_TENANT, *settings.tenants.names, *settings.tenants.overrides}
    )
    bad = [t for t in tenants if not TENANT_PATTERN.fullmatch(t)]
    if bad:
        print(f"specd acl: tenant names must match [A-Za-z0-9_-]{{1,64}}: {', '.join(bad)}", file=sys.stderr)
        return 2
    roles = args.acl_roles or list(ROLES)
    passwords: dict[str, str] = {}
    if args.random_passwords:
        passwords = {
            user: secrets.token_urlsafe(24) for user in ("verifier", "ops", *map(edge_user, tenants))
        }
    for line in rules(settings.redis.key_prefix, tenants, roles, passwords):
        if args.setuser:
            _, name, *rest = line.split(" ")
            line = " ".join(["ACL SETUSER", name, "reset", *rest])
        print(line)
    return 0
