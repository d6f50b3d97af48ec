"""compose.yaml and the Dockerfile: structure, and every SPECD_* variable names a real setting.

`docker compose config -q` validates the file where the compose plugin is installed; this test
checks what matters to specd without Docker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_health_checks_gpu_and_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "verifier", "edge"} <= set(services)
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])
    command = services["redis"]["command"][-1]
    assert "--save ''" in command and "--appendonly no" in command  # persistence off by default
    assert services["redis-persistent"]["profiles"] == ["persistent"]
    [gpu] = services["verifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "replicas" in services["edge"]["deploy"]
    for name in ("verifier", "edge"):
        assert "--check" in " ".join(services[name]["healthcheck"]["test"])
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_specd_variable_is_a_setting(compose: dict[str, Any]) -> None:
    for name in ("verifier", "edge"):
        for variable in compose["services"][name]["environment"]:
            section, key = variable.removeprefix("SPECD_").lower().split("__")
            assert key in Settings.model_fields[section].annotation.model_fields, variable


def test_interpolation_is_well_formed() -> None:
    text = (ROOT / "compose.yaml").read_text()
    stripped = re.sub(r"\$\$|\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}", "", text)
    assert "$" not in stripped, "a $ that compose would misread (write $$ for the container's shell)"


def test_dockerfile_builds_cpu_torch_by_default() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and "ARG TORCH_VARIANT=cpu" in text
    assert 'ENTRYPOINT ["specd"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
