#!/usr/bin/env bash
# scripts/minidfs.sh start|stop DIR — a one-datanode HDFS (Hadoop's MiniDFSCluster) on 127.0.0.1,
# for tests of runs.path=hdfs://... It runs on the Hadoop jars inside the installed pyspark plus
# org.apache.hadoop:hadoop-client-minicluster at the same Hadoop version (and junit, which it loads),
# resolved once by Ivy (pyspark's own ivy jar) into ~/.ivy2/cache.
#   start: prints the filesystem's URI (hdfs://127.0.0.1:PORT); PID, log, config and data in DIR
#   stop:  ends exactly the PID in DIR/pid
# PYTHON names the interpreter whose pyspark to use (default: .venv/bin/python, else python3).
set -euo pipefail

cmd=${1:?usage: minidfs.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: minidfs.sh start|stop DIR}")

if [[ $cmd == stop ]]; then
    if [[ -f $dir/pid ]]; then
        pid=$(cat "$dir/pid")
        kill "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        rm -f "$dir/pid"
    fi
    exit 0
fi
[[ $cmd == start ]] || { echo "usage: minidfs.sh start|stop DIR" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[[ -x $python ]] || python=python3
jars=$("$python" -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')
runtime=$(ls "$jars"/hadoop-client-runtime-*.jar)
version=${runtime##*/hadoop-client-runtime-}
version=${version%.jar}
ivy=$(ls "$jars"/ivy-*.jar)

# the classpath of one Maven artifact (and, unless given -notransitive, its dependencies)
resolve() {
    local out=$dir/cp-$2.txt
    java -jar "$ivy" -dependency "$1" "$2" "$3" -confs default "${@:4}" -cachepath "$out" >"$dir/ivy.log" 2>&1 \
        || { cat "$dir/ivy.log" >&2; exit 1; }
    cat "$out"
}

mkdir -p "$dir"
classpath="$jars/*:$(resolve org.apache.hadoop hadoop-client-minicluster "$version" -notransitive):$(resolve junit junit 4.13.2)"
rm -f "$dir/conf.xml"
(cd "$dir" && exec java -Xmx512m -Dtest.build.data="$dir/data" -cp "$classpath" \
    org.apache.hadoop.mapreduce.MiniHadoopClusterManager -nomr -format -nnport 0 \
    -writeConfig "$dir/conf.xml.tmp" >"$dir/log" 2>&1) &
echo $! >"$dir/pid"
# the manager writes its configuration once the filesystem is up
until [[ -s $dir/conf.xml.tmp ]] && grep -q '</configuration>' "$dir/conf.xml.tmp"; do
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        echo "MiniDFSCluster did not start; its log ($dir/log) ends with:" >&2
        tail -20 "$dir/log" >&2
        rm -f "$dir/pid"
        exit 1
    fi
    sleep 0.5
done
mv "$dir/conf.xml.tmp" "$dir/conf.xml"
uri=$(grep -o 'fs.defaultFS</name><value>[^<]*' "$dir/conf.xml" | sed 's/.*<value>//')
echo "${uri/localhost/127.0.0.1}"
