# sluice in a container (used by deploy/docker-compose.yml). Build from the repository root:
#   docker build -t sluice .
# Stage 1 builds against the CPU-only libtorch view that deploy/setup.sh assembles from the
# PyPI torch wheel; stage 2 keeps only that view's libraries, the binary and the models.
FROM rust:1.95-bookworm AS build
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3-pip unzip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN deploy/setup.sh --no-dataset && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update -q && apt-get install -y -q --no-install-recommends libgomp1 ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/.libtorch/cpu/lib /opt/libtorch/lib
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY --from=build /src/deploy/models /models
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    SLUICE_MODEL_REPOSITORY=/models \
    SLUICE_ADDRESS=0.0.0.0 \
    SLUICE_LOG_FORMAT=json
EXPOSE 8000 8001 8002
# No admin token here: the control API stays on the container's loopback admin listener.
# Set SLUICE_ADMIN_TOKEN (or SLUICE_ADMIN_TOKEN_FILE) to serve it on 8000/8001.
ENTRYPOINT ["sluice"]
CMD ["serve"]
