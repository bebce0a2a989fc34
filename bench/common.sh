# Sourced by the bench scripts, from the project's root.  The project's venv
# goes first on PATH, so the commands the harness records (twistd, python)
# name no folder of this machine; `scrub` replaces the folders a results file
# still names (the harness's scratch folder, the project) with variables.
project=$(pwd)
export PATH="$project/.venv/bin:$PATH" BENCH_PROJECT="$project"
harness=${BENCH_HARNESS:-../shared/bench/run.py}

newest() { ls -t bench/results/*.json | head -1; }

# The newest results (.json and .md), with no path of this machine.
scrub() {
    local json
    json=$(newest)
    sed -i -e "s|${BENCH_TMP:-/tmp/ollamaproxy-bench}|\$BENCH_TMP|g" \
        -e "s|$project|\$BENCH_PROJECT|g" "$json" "${json%.json}.md"
    echo "$json"
}
