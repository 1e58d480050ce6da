# Start-if-missing helpers for the services the test suite talks to. Sourced by scripts/test.
# Each function returns only when its service accepts connections, and fails loudly otherwise
# (with the service's log where it has one). On a bare machine they install what is missing:
# Debian's packages (apt), Apache Kafka's jars (Maven Central), Python and Rust tools.

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

HELIX_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/helix-messaging"

APT_UPDATED=
apt_install() {
  echo "installing $* from Debian's packages" >&2
  if [[ -z $APT_UPDATED ]]; then
    apt-get update -qq || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  # Fault tests start redis-servers of their own and talk to them with redis-cli; the
  # failover tests add sentinels (Debian's redis-sentinel).
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null &&
    command -v redis-sentinel >/dev/null ||
    apt_install redis-server redis-tools redis-sentinel
  port_open 6379 && return 0
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for_port 6379 Redis 30
}

ensure_rabbitmq() {
  if ! port_open 5672; then
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    rabbitmq-server -detached
  fi
  # The node is up for rabbitmqctl (which the fault and topology tests use) only once
  # await_startup answers; before that it fails at once, so it is retried.
  local i
  for ((i = 0; i < 90; i++)); do
    rabbitmqctl await_startup >/dev/null 2>&1 && break
    sleep 1
  done
  if ! rabbitmqctl await_startup >/dev/null 2>&1; then
    echo "error: the RabbitMQ node did not start within 90 s; its log:" >&2
    tail -n 40 /var/log/rabbitmq/rabbit@*.log >&2 2>/dev/null || true
    return 1
  fi
  wait_for_port 5672 RabbitMQ 60
}

# PostgreSQL from Debian's packages, with the `test` database and trust authentication for
# loopback TCP, which the PostgreSQL store tests connect with (host=127.0.0.1 user=postgres
# dbname=test). Trust is for this test server only: it listens on loopback.
ensure_postgres() {
  local psql=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qtA)
  if port_open 5432 && [[ $("${psql[@]}" -c 'SELECT 1' 2>/dev/null) == 1 ]]; then
    # A server that already lets the tests in (started before, or not ours): only the
    # database may be missing.
    ensure_test_database
    return
  fi
  if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    apt_install postgresql
  fi
  local version
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  [[ -d /etc/postgresql/$version/main ]] || pg_createcluster "$version" main >/dev/null
  local hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -q '^# helix-messaging tests' "$hba"; then
    # First matching line wins, so the trust lines go on top.
    { printf '# helix-messaging tests: trust on loopback\n'
      printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'
      cat "$hba"; } >"$hba.new" && mv "$hba.new" "$hba"
    chown postgres:postgres "$hba"
    port_open 5432 && pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
  if ! port_open 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for_port 5432 PostgreSQL 60
  fi
  ensure_test_database
}

ensure_test_database() {
  local psql=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [[ $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'test'") != 1 ]]; then
    "${psql[@]}" -c 'CREATE DATABASE test' >/dev/null
  fi
}

# Apache Kafka in KRaft mode (one process, broker and controller) on 127.0.0.1:9092, from the
# release's jars on Maven Central. They are copied once per machine into the cache (about 10 s
# and 90 MB); the broker then starts on the machine's Java in a few seconds, on a freshly
# formatted data directory under target/kafka.
KAFKA_VERSION=4.1.1
ensure_kafka() {
  port_open 9092 && return 0
  local dir libs
  dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/kafka" && pwd)
  libs="$HELIX_CACHE/kafka-$KAFKA_VERSION/libs"
  if [[ ! -f $libs/.complete ]]; then
    command -v java >/dev/null && command -v mvn >/dev/null || apt_install openjdk-17-jre-headless maven
    echo "fetching Apache Kafka $KAFKA_VERSION's jars from Maven Central (once per machine)" >&2
    rm -rf "$libs"
    mvn -B -q -f "$dir/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs" || return 1
    touch "$libs/.complete"
  fi
  local run
  run=$(pwd)/target/kafka
  rm -rf "$run" && mkdir -p "$run/data"
  cp "$dir/server.properties" "$run/server.properties"
  echo "log.dirs=$run/data" >>"$run/server.properties"
  local java=(java -cp "$libs/*" "-Dlog4j2.configurationFile=$dir/log4j2.yaml")
  "${java[@]}" kafka.tools.StorageTool format --ignore-formatted \
    -t "$("${java[@]}" kafka.tools.StorageTool random-uuid)" \
    -c "$run/server.properties" >"$run/format.log" 2>&1 || {
    echo "error: formatting Kafka's storage failed:" >&2
    tail -n 40 "$run/format.log" >&2
    return 1
  }
  nohup "${java[@]}" -Xms512m -Xmx1g -XX:+UseG1GC kafka.Kafka "$run/server.properties" \
    >"$run/kafka.log" 2>&1 &
  local pid=$! i
  for ((i = 0; i < 240; i++)); do
    port_open 9092 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.25
  done
  echo "error: Apache Kafka did not start on 127.0.0.1:9092; the end of target/kafka/kafka.log:" >&2
  tail -n 40 "$run/kafka.log" >&2
  return 1
}

# Tansu, a Kafka-protocol broker, as an optional second Kafka target (HELIX_KAFKA_BROKER=tansu).
TANSU_VERSION=0.6.0
ensure_tansu() {
  port_open 9092 && return 0
  if ! command -v tansu >/dev/null && [[ ! -x "$HOME/.cargo/bin/tansu" ]]; then
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
  local venv="$HELIX_CACHE/schemathesis-$SCHEMATHESIS_VERSION"
  if [[ ! -x "$venv/bin/schemathesis" ]]; then
    # Debian's own python3 comes without venv and ensurepip.
    command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null ||
      apt_install python3 python3-venv
    echo "installing schemathesis $SCHEMATHESIS_VERSION (once per machine)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export SCHEMATHESIS="$venv/bin/schemathesis"
}

# Prometheus and promtool (Debian's package, 2.42): the shipped alert rules are checked and
# unit-tested with promtool, and a real Prometheus scrapes a running admin server to prove
# every dashboard panel's query. Only the binaries are used; the package's own service is
# not started.
ensure_prometheus() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  apt_install --no-install-recommends prometheus
}

# cargo-nextest runs the suite: the test groups and per-test timeouts in .config/nextest.toml
# only apply under it. Built from crates.io once per machine (a few minutes).
NEXTEST_VERSION=0.9.151
ensure_nextest() {
  cargo nextest --version >/dev/null 2>&1 && return 0
  echo "installing cargo-nextest $NEXTEST_VERSION (once per machine)" >&2
  cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked \
    --no-default-features --features default-no-update
}
