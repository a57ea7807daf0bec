#!/usr/bin/env bash
# README's test command: set up a fresh machine, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
resources/setup.sh
cargo nextest run --workspace --no-fail-fast
