#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ on their corpus.
#
#   resources/fuzz.sh TARGET SECONDS   one target
#   resources/fuzz.sh all SECONDS      every target, one after the other
#
# Each run starts from the seed corpus in fuzz/corpus/TARGET (read only)
# plus what earlier runs found in fuzz/target/corpus/TARGET (the fuzzer
# writes there), and prints one line per target:
#
#   TARGET: N executions, cov X, ft Y, crashes 0
#
# A crash (panic, sanitizer report, timeout or leak) leaves its input in
# fuzz/artifacts/TARGET/, prints the target's own report of it, and makes
# the script exit non-zero (with `all`, after the other targets ran).
#
# Environment: FUZZ_SANITIZER (default: address with the nightly
# toolchain, none without it), FUZZ_ARGS (extra libFuzzer flags),
# FUZZ_TOOLCHAIN=stable (build with the default toolchain even where
# nightly is).
#
# With the nightly toolchain the targets build as cargo-fuzz expects. A
# machine with only stable Rust (CI's: no other toolchain can be fetched
# there) builds them with stable and RUSTC_BOOTSTRAP=1, without a
# sanitizer: libFuzzer's coverage instrumentation needs only stable
# codegen flags, and a panic is still a crash.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

usage() {
    echo "usage: $0 TARGET|all SECONDS" >&2
    exit 2
}
[ $# -eq 2 ] || usage
target=$1
seconds=$2
[[ $seconds =~ ^[0-9]+$ ]] || usage

if [ "${FUZZ_TOOLCHAIN:-}" != stable ] && rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=+nightly
    sanitizer=${FUZZ_SANITIZER:-address}
else
    echo "no nightly toolchain: fuzzing with the default one (RUSTC_BOOTSTRAP=1), no sanitizer" >&2
    toolchain=
    export RUSTC_BOOTSTRAP=1
    sanitizer=${FUZZ_SANITIZER:-none}
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=$(cargo $toolchain fuzz list)
if [ "$target" = all ]; then
    run_targets=$targets
elif grep -qx -- "$target" <<<"$targets"; then
    run_targets=$target
else
    echo "no fuzz target '$target'; the targets are:" >&2
    echo "$targets" >&2
    exit 2
fi

echo "building the fuzz targets (sanitizer: $sanitizer)" >&2
cargo $toolchain fuzz build -s "$sanitizer" $([ "$target" = all ] || echo "$target") >&2

logs=target/fuzz-logs
mkdir -p "$logs"
failed=0
for t in $run_targets; do
    work=target/corpus/$t
    seeds=corpus/$t
    mkdir -p "$work" "$seeds" "artifacts/$t"
    log=$logs/$t.log
    # The targets log what they refuse on stderr: keep libFuzzer's own
    # output (close_fd_mask=2 closes only the target's stderr).
    status=0
    cargo $toolchain fuzz run -s "$sanitizer" "$t" "$work" "$seeds" -- \
        -max_total_time="$seconds" -timeout=20 -close_fd_mask=2 \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    # libFuzzer prints the running stats as "#N <event> cov: X ft: Y ...".
    last=${done_line:-$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -n 1 || true)}
    execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")
    # -print_final_stats gives the exact count when the run ends normally.
    final=$(sed -nE 's/^stat::number_of_executed_units:[[:space:]]*([0-9]+)/\1/p' "$log" | tail -n 1)
    execs=${final:-${execs:-0}}
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    crashes=0
    if [ "$status" -ne 0 ] || [ -z "$done_line" ]; then
        crashes=1
        failed=1
    fi
    echo "$t: $execs executions, cov ${cov:-0}, ft ${ft:-0}, crashes $crashes"
    if [ "$crashes" -ne 0 ]; then
        artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
        echo "  $t failed (exit $status); log: $PWD/$log" >&2
        if [ -n "$artifact" ]; then
            echo "  input: $artifact; the target's report of it:" >&2
            # Once more without closing stderr, for the panic message (a
            # hang is cut short).
            timeout 120 cargo $toolchain fuzz run -s "$sanitizer" "$t" "$artifact" \
                -- -timeout=20 2>&1 |
                grep -vE '^(INFO|MERGE|#)' | head -n 40 | sed 's/^/    /' >&2 || true
        else
            tail -n 20 "$log" | sed 's/^/    /' >&2
        fi
    fi
done
exit "$failed"
