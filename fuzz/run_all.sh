#!/bin/sh
# The recorded fuzzing run (see fuzz/README.md): 3,000,000 executions in all.
# Known findings (already pinned by regression tests) are counted, not fatal,
# so the run keeps looking for new ones; a new finding stops its harness and
# leaves fuzz/crashes/crash-<sha1>.
set -u
cd "$(dirname "$0")/.."
python fuzz/make_corpus.py
export CONDUIT_FUZZ_SKIP_KNOWN=1
COMMON="-max_len=4200 -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=fuzz/crashes/"
python fuzz/fuzz_decoder.py   -runs=2000000 $COMMON fuzz/corpus/decoder
python fuzz/fuzz_sealed.py    -runs=600000 $COMMON fuzz/corpus/sealed
python fuzz/fuzz_handshake.py -runs=400000 $COMMON fuzz/corpus/handshake
