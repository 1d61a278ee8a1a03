# Stand-ins for the official redis and haproxy images, which no registry here can serve:
# Debian 12's redis-server and haproxy, the releases the tests run and the multi-GPU layout
# pins (redis:7.0, haproxy:2.6). docker/compose.multi-gpu.cpu.yml runs each with its command.
ARG BASE_IMAGE=onellm-cpu-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server haproxy \
    && rm -rf /var/lib/apt/lists/*
# Redis as the official image has it. Protected mode off: that image builds Redis with it off
# (a container's network is its boundary), where Debian's default refuses every client but
# loopback, the gateways included. /data owned by redis: the files store's named volume,
# mounted there, inherits that ownership.
RUN printf '#!/bin/sh\nexec /usr/bin/redis-server "$@" --protected-mode no\n' >/usr/local/bin/redis-server \
    && chmod 755 /usr/local/bin/redis-server \
    && install -d -o redis -g redis /data
