#!/usr/bin/env bash
# Runs every test of kata-like on a fresh Debian 12 machine (as root, with Rust installed):
# installs the packages it needs, checks formatting and lints, builds the guest kernel (cached)
# and checks its config, runs the unit and host tests, then the end-to-end tests that boot real
# pod VMs (inside the KVM test host when this machine's /dev/kvm cannot boot Linux).
set -euo pipefail
cd "$(dirname "$0")"
step() { echo; echo "=== test.sh: $* ($(date +%T))"; }

step "installing packages"
tests/install-deps
step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
step "guest kernel"
kernel-config/build
kernel-config/check-config
step "release build and guest initramfs"
cargo build --release --workspace --bins
agent/initramfs/build
agent/initramfs/build --debug --agent target/x86_64-unknown-linux-gnu/guest/kata-like-agent
vmm/tests/build-test-initramfs
step "unit and host tests"
cargo test --release --workspace --no-fail-fast
step "end-to-end tests"
tests/run-e2e
step "all tests passed"
