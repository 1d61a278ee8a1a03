# Stand-ins for the official redis and haproxy images, which no registry here can serve:
# Debian 12's redis-server and haproxy, the releases the tests run and the multi-GPU layout
# pins (redis:7.0, haproxy:2.6). docker/compose.multi-gpu.cpu.yml runs each with its command.
ARG BASE_IMAGE=onellm-cpu-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server haproxy \
    && rm -rf /var/lib/apt/lists/*
