#!/bin/sh
# Soaks of blkvm storage-daemon at full size, printing what they did and
# what they checked (CI runs the same tests at a reduced size):
#   export-churn  1000 vhost-user frontend sessions (libblkio client:
#                 connect, verified I/O, disconnect); daemon fds equal and
#                 RSS within 5% after the last session of after the first.
#   qmp-churn     1000 QMP connections with valid and invalid commands and
#                 blockdev-add/-del, block-export-add/-del cycles; every
#                 answer checked; fds equal and RSS within 5%.
#   kill9         100 kill -9 of the daemon under a writer (our nbd client)
#                 that records acknowledged flushes; every acknowledged
#                 write is in the image after each kill.
# Usage: resources/soak/run.sh [export-churn|qmp-churn|kill9|all]
set -eu
cd "$(dirname "$0")/../.."
what=${1:-all}
run() {
    echo "== $1"
    cargo nextest run -p tests --test "$2" --no-capture "$3"
}
case $what in
export-churn|all) BLKVM_SOAK_SESSIONS=${BLKVM_SOAK_SESSIONS:-1000} \
    run export-churn libblkio_client daemon_fds_and_rss_stay_flat_across_many_frontend_sessions ;;
esac
case $what in
qmp-churn|all) BLKVM_SOAK_QMP=${BLKVM_SOAK_QMP:-1000} \
    run qmp-churn soak qmp_churn_answers_right_and_leaks_nothing ;;
esac
case $what in
kill9|all) BLKVM_SOAK_KILLS=${BLKVM_SOAK_KILLS:-100} \
    run kill9 soak kill_9_loses_no_acknowledged_write ;;
esac
