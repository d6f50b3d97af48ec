"""`specd acl`: the printed rules follow the key layout; bad tenant names are refused."""

from __future__ import annotations

from broker.acl import edge_rule
from broker.streams import Keys
from common.settings import Settings
from specd import acl
from specd.cli import build_parser


def main(argv: list[str]) -> int:
    """`specd acl ...` without the CLI's logging set-up (which would bind capsys' stream)."""
    return acl.run(build_parser().parse_args(argv), Settings())


def test_acl_prints_one_edge_user_per_tenant(capsys) -> None:
    assert main(["acl", "--tenant", "acme", "--tenant", "globex"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "user default off"
    assert [line.split()[1] for line in lines] == ["default", "verifier", "edge-acme", "edge-globex", "ops"]
    assert "%W~specd:opens:{acme}" in lines[2] and "~specd:{acme.*}:*" in lines[2]
    assert "+set" not in lines[2].split("(")[0]  # SET only on its heartbeat (the selector)


def test_acl_setuser_form_and_bad_tenant(capsys) -> None:
    assert main(["acl", "--tenant", "acme", "--role", "edge", "--setuser", "--random-passwords"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("ACL SETUSER edge-acme reset on >") and ">PASSWORD" not in out[1]
    assert main(["acl", "--tenant", "a.b"]) == 2
    assert "[A-Za-z0-9_-]" in capsys.readouterr().err


def test_edge_rule_names_the_keys_the_code_uses() -> None:
    keys = Keys("p")
    rule = edge_rule("p", "t")
    assert f"%W~{keys.opens('t')}" in rule and keys.drafts("t.x").startswith("p:{t.")
