#!/bin/bash
# usage: profile.sh OUT SRC_TREE [PARSER]: py-spy of hxgwd from SRC_TREE/hxgwd (a git archive) on
# bench/gateway.toml, chat at 64 conns (gateway 4610, upstream 18680); OUT/cpu-unprofiled.txt: CPU
# per request without the profiler; then bench/stages.py OUT/profile.txt --us-per-request N
set -e
OUT=$1; SRC=$2; PARSER=${3:-}
WT=${WT:-$(git rev-parse --show-toplevel)}; SHARED=${SHARED_BENCH:-$WT/../shared/bench}
PORT=4610; UP=18680; W=$(mktemp -d /tmp/hxgwd-prof-XXXX); mkdir -p $OUT
export BENCH_RUN_DIR=$W/servers BENCH_UPSTREAM_PORT=$UP
bash $SHARED/servers.sh start upstream >/dev/null
sed -e "s/127.0.0.1:4010/127.0.0.1:$PORT/" -e "s/:18080/:$UP/" -e "s#^url = \"sqlite:[^\"]*\"#url = \"sqlite:///$W/hxgwd.db\"#" $WT/bench/gateway.toml > $W/gateway.toml
[ -n "$PARSER" ] && sed -i "0,/^\[server\]/s//[server]\nhttp_parser = \"$PARSER\"/" $W/gateway.toml
sed "s/@CHAT_MODEL@/fake-model/" $SHARED/bodies/chat.json > $W/chat.json
cd $W
PYTHONPATH=$SRC HXBENCH_UPSTREAM_KEY=dummy ${HXGWD_PYTHON:-$WT/.venv/bin/python} -m hxgwd -c $W/gateway.toml 2>$W/hxgwd.log &
PID=$!
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$PORT/healthz && break; sleep 0.1; done
wrkrun(){ wrk -t1 -c64 -d${1}s -s $SHARED/wrk/openai.lua http://127.0.0.1:$PORT/v1/chat/completions -- POST $W/chat.json sk-hx-bench; }
cpu(){ awk '{print $14+$15}' /proc/$PID/stat; }
wrkrun 2 >/dev/null
c0=$(cpu); wrkrun 10 > $OUT/wrk-unprofiled.txt; c1=$(cpu)
REQ=$(grep -o '[0-9]* requests in' $OUT/wrk-unprofiled.txt | cut -d' ' -f1)
echo "cpu_ticks=$((c1-c0)) requests=$REQ us_per_req=$(( (c1-c0)*10000*1000/REQ/1000 ))" > $OUT/cpu-unprofiled.txt
wrkrun 18 > $OUT/profile-wrk.txt &
WP=$!
sleep 2
${PYSPY:-py-spy} record --pid $PID --duration 12 --rate 250 --format raw --full-filenames -o $OUT/profile.txt >$OUT/pyspy.log 2>&1 || true
wait $WP
kill -TERM $PID; wait $PID || true
bash $SHARED/servers.sh stop upstream >/dev/null
rm -rf $W
cat $OUT/cpu-unprofiled.txt
