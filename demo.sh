#!/usr/bin/env bash
# The main job of kata-like, on a fresh Debian 12 machine (as root, with Rust installed):
# installs what it needs, builds kata-like and its guest kernel, then acts as kubelet against
# Debian's containerd and runs a pod whose container runs in its own microVM (RuntimeClass handler
# `kata-like`). Prints the container's output and how long each phase took. Runs inside the KVM
# test host when this machine's /dev/kvm cannot boot Linux.
set -euo pipefail
cd "$(dirname "$0")"
tests/install-deps
export KATA_LIKE_KERNEL=$(kernel-config/build | tail -n1)
cargo build --release --workspace --bins
export KATA_LIKE_INITRD=$(agent/initramfs/build | tail -n1)
export KATA_LIKE_VMM=$PWD/target/release/kata-like-vmm
export KATA_LIKE_SHIM=$PWD/target/release/containerd-shim-kata-like-v2
exec tests/kvm-host/run --if-needed --timeout 1200 -- target/release/kata-like-demo
