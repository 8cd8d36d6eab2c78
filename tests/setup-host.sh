#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real (run as root).
# Every package here is a real peer or real part: the suite fails, never skips, without them.
set -euo pipefail

PACKAGES=(
  containerd            # the real containerd, ctr and containerd-shim-runc-v2 we compare against
  docker.io             # the real dockerd 20.10 (and docker CLI) run over berthd and containerd
  iptables              # dockerd's port publishing and bridge rules
  runc crun             # OCI runtimes
  busybox-static        # the busybox image the tests build
  docker-registry       # the distribution registry that pulls and pushes talk to
  openssl               # certificates for the registry's TLS tests
  nghttp2-client        # h2load for the benchmarks' load generator
  libnghttp2-14         # berthd's gRPC server speaks HTTP/2 through it (core/grpc/nghttp2.py)
  socat
  gcc libc6-dev         # static probes built by the container-escape tests
  binutils-aarch64-linux-gnu qemu-user  # the exec stub's aarch64 code, assembled and run
  iproute2
  util-linux            # unshare(1) makes a CRI pod's user namespace; nsenter in its test
  containernetworking-plugins  # the real CNI plugins (bridge, host-local, portmap, firewall...) in /usr/lib/cni
  python3-venv
  ca-certificates
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The suite starts its own containerd in temporary folders; a system one is not needed.
for bin in containerd ctr containerd-shim-runc-v2 runc busybox h2load docker-registry gcc dockerd \
    docker docker-proxy iptables; do
  command -v "$bin" >/dev/null || { echo "setup-host: $bin missing after install" >&2; exit 1; }
done
for bin in bridge host-local portmap firewall loopback; do
  [ -x "/usr/lib/cni/$bin" ] || { echo "setup-host: /usr/lib/cni/$bin missing" >&2; exit 1; }
done
