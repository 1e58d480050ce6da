# Start-if-missing helpers for the brokers the test suite talks to. Sourced by scripts/test.
# Each function returns only when the broker accepts connections, and fails loudly otherwise.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() { # port, what, seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do
    port_open "$1" && return 0
    sleep 0.25
  done
  echo "error: $2 is not accepting connections on 127.0.0.1:$1 after $3 s" >&2
  return 1
}

apt_install() {
  echo "installing $* from Debian packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for_port 6379 Redis 30
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
  local i
  for ((i = 0; i < 60; i++)); do
    rabbitmqctl await_startup >/dev/null 2>&1 && break
    sleep 1
  done
  wait_for_port 5672 RabbitMQ 60
}

ensure_postgres() {
  port_open 5432 && return 0
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  wait_for_port 5432 PostgreSQL 60
}

TANSU_VERSION=0.6.0

ensure_tansu() {
  port_open 9092 && return 0
  if ! command -v tansu >/dev/null && [[ ! -x "$HOME/.cargo/bin/tansu" ]]; then
    # Built without optimisation or debug info: well under half the time of a release build
    # (522 s against 1,417 s on a 2-core machine, each while other builds ran), and the whole
    # Kafka suite passes on it in about the same time. For benchmarks, a release build
    # (`cargo install tansu --locked --version 0.6.0 --features dynostore`) keeps the broker
    # from being the bottleneck; this script uses whichever is installed.
    echo "building the Tansu Kafka-protocol broker $TANSU_VERSION (once per machine, ~5-9 min)" >&2
    CARGO_PROFILE_DEV_DEBUG=0 cargo install --debug tansu --locked --version "$TANSU_VERSION" --features dynostore
  fi
  local tansu
  tansu=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
  mkdir -p target
  nohup "$tansu" broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >target/tansu.log 2>&1 &
  wait_for_port 9092 "Tansu (log: target/tansu.log)" 60
}

# schemathesis (PyPI), for the admin API's property-based OpenAPI test: installed once per
# machine into a virtualenv of its own, then named in SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/helix-messaging/schemathesis-$SCHEMATHESIS_VERSION"
  if [[ ! -x "$venv/bin/schemathesis" ]]; then
    echo "installing schemathesis $SCHEMATHESIS_VERSION (once per machine)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export SCHEMATHESIS="$venv/bin/schemathesis"
}
