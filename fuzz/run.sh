#!/usr/bin/env bash
# Runs every cargo-fuzz target over a bounded, seeded number of inputs (docs/PROTOCOL.md §10).
#
#   fuzz/run.sh [RUNS]      # RUNS inputs per target, default 1000000
#
# libFuzzer's sanitizer flags need the nightly toolchain. Where there is none (or cargo-fuzz
# cannot be installed, or the sanitizer build fails on this nightly), it says so and exits 0:
# the default suite's proptest fuzzing still runs, and CI checks on stable that the targets
# build (`.ci/run`), so a target broken by an API change fails there. A crash it finds fails
# it, with the input saved under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
runs=${1:-1000000}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: no nightly toolchain here; skipping the cargo-fuzz runs"
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  if ! cargo install cargo-fuzz --locked; then
    echo "fuzz: cargo-fuzz could not be installed; skipping the cargo-fuzz runs"
    exit 0
  fi
fi
if ! cargo +nightly fuzz build; then
  echo "fuzz: the targets do not build on this nightly; skipping the cargo-fuzz runs"
  exit 0
fi
for target in $(cargo +nightly fuzz list); do
  echo "fuzz: $target, $runs inputs"
  # A fixed seed and a count, not a time: the same build explores the same inputs every run.
  cargo +nightly fuzz run "$target" -- -runs="$runs" -seed=1
done
