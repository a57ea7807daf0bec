#!/usr/bin/env bash
# README's test command: set up a fresh machine, then run every test and
# every fuzz target briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
resources/setup.sh
status=0
cargo nextest run --workspace --no-fail-fast || status=$?
# Every fuzz target for a short while, from its corpus (fuzz/corpus): a
# crash on the corpus, or one found in those seconds, fails the run. The
# long runs are resources/fuzz.sh TARGET SECONDS.
resources/fuzz.sh all "${BLKVM_FUZZ_SECONDS:-20}" || status=$?
exit "$status"
