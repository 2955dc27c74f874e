# sluice in a container. `make image` builds it with podman (deploy/image/build.sh) and
# `make image-test` runs it and checks it (deploy/image/test.sh); Docker builds it too
# (deploy/docker-compose.yml, or `docker build -t sluice:local .` from the repository root).
#
# The base images are build arguments. They default to the official images; where those
# cannot be pulled, deploy/image/bases.sh makes equivalents from Debian's packages and
# build.sh passes their names here (docs/deploy.md, "Container image").
ARG BUILD_BASE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_BASE=docker.io/library/debian:bookworm-slim

# ---- build: libtorch from the pinned wheel (deploy/setup.sh), then sluice -----------------
FROM ${BUILD_BASE} AS build
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3-pip unzip binutils patchelf \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# libtorch (and Debian's oneDNN) first, from setup.sh and the shell functions it sources
# alone: these layers (and the ~550 MB wheel download) are reused until they change (setup.sh
# holds the pin). `make image` mounts the host's .libtorch/wheels at /src/.libtorch/wheels,
# so a set-up checkout downloads nothing here.
# The binary's rpath is $LIBTORCH/lib (build.rs), so it is built against libtorch at the path
# the runtime stage installs it at.
COPY deploy/setup.sh deploy/lib.sh deploy/
RUN deploy/setup.sh --no-dataset && ln -s /src/.libtorch/cpu /opt/libtorch
ENV LIBTORCH=/opt/libtorch
# The runtime's share of libtorch: libtorch_cpu and c10 (what tch links without CUDA) and the
# libraries of the view they load — the wheel's libgomp, and the CUDA runtime and CUPTI that
# libtorch_cpu is linked against — without their local symbol tables. Everything else stays
# behind: headers, libtorch_python, libtorch.so, libshm, libtorch_global_deps, CUPTI's
# profiler helpers (nvperf, pcsamplingutil, checkpoint). Beside them, Debian's oneDNN (the
# library sluice's convolutions run on) and the OpenCL loader it links, its rpath set to its
# own folder so that it finds them and the wheel's libgomp there: one OpenMP runtime, and
# nothing to install in the runtime stage. The build checks the binary below.
RUN mkdir -p /out/lib \
 && { ls /opt/libtorch/lib/libtorch_cpu.so /opt/libtorch/lib/libc10.so; \
      ldd /opt/libtorch/lib/libtorch_cpu.so /opt/libtorch/lib/libc10.so | awk '$3 ~ "^/opt/libtorch/" { print $3 }'; } \
    | sort -u > /tmp/libs \
 && while read -r lib; do strip --strip-unneeded -o "/out/lib/$(basename "$lib")" "$lib"; done < /tmp/libs \
 && for lib in libdnnl.so.2 libOpenCL.so.1; do \
      path=$(ldconfig -p | awk -v l="$lib" '$1 == l { print $NF; exit }') \
      && [ -n "$path" ] && cp -L "$path" "/out/lib/$lib" || { echo "no $lib (deploy/setup.sh installs libdnnl-dev)"; exit 1; }; \
    done \
 && patchelf --set-rpath '$ORIGIN' /out/lib/libdnnl.so.2 \
 && ls -l /out/lib
COPY . .
# crates.io downloads and the target folder are cache mounts: a rebuild after a source change
# fetches nothing and recompiles only what changed. The binary loses its DWARF line tables
# (112 MB; panics still name functions), and must load every library picked above (looked up
# in /out/lib first, as it will be in /opt/libtorch/lib; the runtime stage checks that
# nothing is missing there).
RUN --mount=type=cache,id=sluice-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=sluice-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=sluice-target,target=/src/target \
    cargo build --release --locked \
 && objcopy --strip-debug target/release/sluice /out/sluice \
 && ls /out/lib | sort > /tmp/libs \
 && LD_LIBRARY_PATH=/out/lib ldd /out/sluice | awk '$3 ~ "^/out/lib/" { sub(".*/", "", $3); print $3 }' | sort -u > /tmp/loads \
 && if ! cmp -s /tmp/libs /tmp/loads; then \
      echo "the binary loads other libraries from /out/lib than it holds:"; diff /tmp/libs /tmp/loads; exit 1; \
    fi

# ---- runtime: the binary, those libraries and the shipped models --------------------------
# The final stage runs no command: `make image` mounts build-only files into every RUN step
# (podman build --volume: the host's wheels and CA bundle), and their mount points would stay
# behind in the image. Its user comes from this stage, made on the same base, which also
# checks that the binary finds every library there and starts.
FROM ${RUNTIME_BASE} AS user
COPY --from=build /out/lib/ /opt/libtorch/lib/
COPY --from=build /out/sluice /usr/local/bin/sluice
# uid/gid 10001: a fixed, numeric non-root user (Kubernetes' runAsNonRoot can check a number,
# and deploy/kubernetes/ sets the same ids).
RUN groupadd --gid 10001 sluice \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin --no-log-init sluice \
 && ! ldd /usr/local/bin/sluice | grep 'not found' \
 && /usr/local/bin/sluice --version

FROM ${RUNTIME_BASE}
COPY --from=user /etc/passwd /etc/group /etc/shadow /etc/gshadow /etc/
COPY --from=build /out/lib/ /opt/libtorch/lib/
COPY --from=build /out/sluice /usr/local/bin/sluice
# The model repository. The shipped model is the default; mount a repository over /models to
# serve yours. Owned by sluice so that gating changes persist (policy.json beside the model);
# a read-only mount wants SLUICE_NO_PERSIST_POLICY=true.
COPY --chown=10001:10001 deploy/models /models
ENV SLUICE_MODEL_REPOSITORY=/models \
    SLUICE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000 8001 8002
# No admin token here: the control API stays on the container's loopback admin listener
# (`podman exec <container> sluice ctl ...`). Set SLUICE_ADMIN_TOKEN or, better,
# SLUICE_ADMIN_TOKEN_FILE (a mounted secret) to serve it on 8000/8001.
#
# sluice is PID 1 (exec form, no shell, no init): SIGTERM from `podman stop`/Kubernetes
# reaches it directly; it stops accepting, finishes in-flight requests (up to
# SLUICE_SHUTDOWN_TIMEOUT, 30 s) and exits 0. It starts no child processes to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Inference server for dynamically pruned CNNs (KServe Open Inference Protocol v2, HTTP and gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"
