#!/usr/bin/env bash
# Throughput of mailforward end to end, comparable with shared/peer/bench.sh:
#   smtp-source -> mailforward serve (SQLite lookups, SRS, pass-through) -> smtp-sink
# and smtp-source -> smtp-sink directly (the loopback ceiling). Prints msgs/s.
# usage: bench/throughput.sh [messages] [sessions] [size_bytes]
# Needs Postfix's smtp-source/smtp-sink (Debian package postfix). Loopback only;
# every process it starts is stopped by PID at the end.
set -eu
N=${1:-2000}; S=${2:-20}; L=${3:-1024}
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 2; }
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SMTP_PORT=$(free_port); SINK_PORT=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

as_user=(); [ "$(id -u)" = 0 ] && as_user=(-u "$(id -un postfix 2>/dev/null || echo nobody)")
smtp-sink "${as_user[@]}" 127.0.0.1:"$SINK_PORT" 1024 >/dev/null 2>&1 & pids+=($!)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/srs.secret"; chmod 600 "$work/srs.secret"
cat > "$work/mailforward.toml" <<TOML
[server]
hostname = "mail.example.com"
listen = ["127.0.0.1:$SMTP_PORT"]
client_connection_count_limit = 1000
client_connection_rate_limit = 100000
[database]
url = "sqlite:///$work/mailforward.db"
[delivery]
relay_host = "[127.0.0.1]:$SINK_PORT"
spool_directory = "$work/spool"
[auth]
verify = false
[srs]
domain = "example.org"
secret_file = "$work/srs.secret"
TOML
cd "$work"
mailforward db init >/dev/null
mailforward domain add example.org >/dev/null
mailforward alias add alice@example.org alice@sink.test >/dev/null
mailforward serve 2>"$work/serve.log" & pids+=($!)
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$SMTP_PORT),1)" 2>/dev/null && break; sleep 0.1; done

t0=$(date +%s.%N)
smtp-source -s "$S" -m "$N" -l "$L" -f sender@ext.test -t alice@example.org 127.0.0.1:"$SMTP_PORT"
t1=$(date +%s.%N)
smtp-source -s "$S" -m "$N" -l "$L" -f sender@ext.test -t alice@example.org 127.0.0.1:"$SINK_PORT"
t2=$(date +%s.%N)
accepted=$(grep -c "status=250" "$work/serve.log" || true)
rss=$(ps -o rss= -p "${pids[1]}" | tr -d ' ')
python3 -c "
n=$N; e=$t1-$t0; d=$t2-$t1
print(f'messages={n} sessions=$S size=$L  mailforward_end_to_end={n/e:.0f}/s  direct_to_sink={n/d:.0f}/s  ratio={(n/e)/(n/d):.3f}  accepted_250={$accepted}  server_rss={$rss/1024:.0f}MiB')"
