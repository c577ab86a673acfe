#!/bin/bash
set -e
WT=${WT:-$(cd "$(dirname "$0")/../../.." && pwd)}; SHARED=${SHARED_BENCH:-$WT/../shared/bench}
PORT=4510; UP=18480; W=$(mktemp -d /tmp/hxgwd-prof-XXXX); OUT=$1; mkdir -p $OUT
export BENCH_RUN_DIR=$W/servers BENCH_UPSTREAM_PORT=$UP
bash $SHARED/servers.sh start upstream
sed -e "s/127.0.0.1:4010/127.0.0.1:$PORT/" -e "s/:18080/:$UP/" -e "s#^url = \"sqlite:[^\"]*\"#url = \"sqlite:///$W/hxgwd.db\"#" $WT/bench/gateway.toml > $W/gateway.toml
sed "s/@CHAT_MODEL@/fake-model/" $SHARED/bodies/chat.json > $W/chat.json
cd $W
PYTHONPATH=$WT HXBENCH_UPSTREAM_KEY=dummy /work/main/.venv/bin/python -m hxgwd -c $W/gateway.toml 2>$W/hxgwd.log &
PID=$!
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$PORT/healthz && break; sleep 0.1; done
wrkrun(){ wrk -t1 -c64 -d${1}s -s $SHARED/wrk/openai.lua http://127.0.0.1:$PORT/v1/chat/completions -- POST $W/chat.json sk-hx-bench; }
cpu(){ awk '{print $14+$15}' /proc/$PID/stat; }
wrkrun 2 >/dev/null
# unprofiled CPU per request
c0=$(cpu); wrkrun 10 > $OUT/wrk-unprofiled.txt; c1=$(cpu)
echo "cpu_ticks=$((c1-c0)) clk_tck=$(getconf CLK_TCK)" > $OUT/cpu-unprofiled.txt
wrkrun 26 > $OUT/profile-wrk.txt &
WP=$!
sleep 2
c0=$(cpu)
${PYSPY:-py-spy} record --pid $PID --duration 20 --rate 250 --format raw --full-filenames -o $OUT/profile.txt >$OUT/pyspy.log 2>&1 || true
c1=$(cpu); echo "cpu_ticks_during_profile=$((c1-c0))" >> $OUT/cpu-unprofiled.txt
wait $WP
kill -TERM $PID; wait $PID || true
bash $SHARED/servers.sh stop upstream
cp $W/gateway.toml $OUT/
rm -rf $W
