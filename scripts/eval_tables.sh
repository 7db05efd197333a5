#!/usr/bin/env bash
# The README's strategy tables (issue 13) and the quantized-KV quality grid (issue 12), n = 50 per cell:
#   needle:   rulerniah_single, 2k context, 12 new tokens; every strategy at a 50%, 25% and 10% budget
#             (retrieval: 50/75/90% pruned), in the three protocols (context, stream, query-aware)
#   fidelity: KL(full || compressed) over 16 forced tokens of the needle prompts at 1k, same grid
#   ppl:      wikitext-2 test, 50 windows of 1,024 tokens (512 prefilled, 512 teacher-forced): context (the
#             prefill compressed, every strategy) and stream (evicted while forced; not the prefill-only ones)
#   kv bits:  fidelity at 8/4/2 bits, full and stacked with snapkv/h2o at 50% and 25%; pg19 ppl the same (40
#             windows of 2k, the 4 books in turn, 1,536 tokens prefilled and 512 teacher-forced)
# Samples run in batches (--batch_size: each row with its own caches, as alone; a GPU step costs about the
# same for 1 or 50 rows). Jobs (one eval.py each) run JOBS at a time, most important first; each eval writes
# every sample as made and resumes, so a run cut by DEADLINE (seconds from the start) loses nothing.
# Extra arguments go to every eval.py call (e.g. --device cuda --dtype float32); MATCH=text runs only the
# jobs whose arguments contain it (MATCH=kv_bits: the quantized grid).
#   JOBS=4 DEADLINE=540 bash scripts/eval_tables.sh --results_dir results/tables --device cuda --dtype float32
#   python eval.py --report results/tables       # the tables, paired intervals and Pareto plots
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
END=$(( $(date +%s) + ${DEADLINE:-100000000} ))
NEEDLE="--tasks rulerniah_single --context_length 2048 --num_samples 50 --max_new_tokens 12 --batch_size 50"
FIDELITY="--tasks fidelity --fidelity_task rulerniah_single --fidelity_tokens 16 --context_length 1024 --num_samples 50 --batch_size 50"
PPL="--tasks ppl --ppl_corpus wikitext2 --context_length 1024 --num_samples 50 --batch_size 25"
PREFILL_ONLY="snapkv pyramid adakv headkv dililazy"
BUDGETS="--max_cache_length 0.5 0.25 0.1"

jobs() {  # one line per eval.py call (its arguments); a call runs several configurations on one loaded model
    local task protocol r group
    for task in "$NEEDLE" "$FIDELITY" "$PPL"; do
        for protocol in "" "--protocol stream" "--query_aware"; do
            [ "$task" = "$FIDELITY" ] && [ -n "$protocol" ] && continue  # fidelity: the context protocol
            [ "$task" = "$PPL" ] && [ "$protocol" = "--query_aware" ] && continue  # ppl has no question
            for group in "streamingllm random l2 lsh" "h2o tova scissorhands" "snapkv pyramid adakv headkv dililazy"; do
                # ppl stream: prefill-only strategies never evict while decoding, so the 512 forced tokens
                # would overflow any budget below the window
                if [ "$task" = "$PPL" ] && [ -n "$protocol" ]; then
                    group=$(for s in $group; do [[ " $PREFILL_ONLY " == *" $s "* ]] || echo -n "$s "; done)
                    [ -z "$group" ] && continue
                fi
                echo "$task $protocol --cache_strategy $group $BUDGETS"
            done
            # retrieval reads the same fractions (pruned:read) whatever the protocol: ppl runs it once
            [ "$task" = "$PPL" ] && [ -z "$protocol" ] || for r in 0.5:0.5 0.75:0.25 0.9:0.1; do
                echo "$task $protocol --cache_strategy spotlight spotlight_linear lsh_retrieval quest --spotlight_prune ${r%:*} --quest_budget ${r#*:}"
            done
            echo "$task $protocol --cache_strategy full"
        done
    done
    local PG19="--tasks ppl --ppl_corpus pg19 --context_length 2048 --ppl_prefill 1536 --num_samples 40 --batch_size 20" s b
    echo "$FIDELITY --cache_strategy full --kv_bits 8 4 2"
    for s in "snapkv 0.5" "h2o 0.5" "snapkv 0.25" "h2o 0.25"; do
        echo "$FIDELITY --cache_strategy ${s% *} --max_cache_length ${s#* } --kv_bits 16 8 4 2"
    done
    for s in "full" "snapkv --max_cache_length 0.5" "h2o --max_cache_length 0.5" "snapkv --max_cache_length 0.25" \
             "h2o --max_cache_length 0.25"; do
        for b in 16 4 2 8; do echo "$PG19 --cache_strategy $s --kv_bits $b"; done
    done
}

run_one() {  # $1: a job line; the rest: the script's extra arguments
    local left=$(( END - $(date +%s) )) line=$1; shift
    [ $left -le 5 ] && { echo "skipped (deadline): $line"; return 0; }
    local t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout $left $PY eval.py --threads 1 $line "$@" > /dev/null 2>> "${LOG:-/dev/stderr}"
    echo "rc=$? $(( $(date +%s) - t0 )) s: $line"
}
export -f run_one; export PY END LOG
jobs | grep -e "${MATCH:-}" | tr '\n' '\0' | xargs -0 -P "${JOBS:-1}" -I{} bash -c 'run_one "$@"' _ {} "$@"
