//! `helixctl`: operate helix-messaging from the shell.
//!
//! Talks to the admin API (`--url`, default `http://127.0.0.1:7061`, with the bearer token
//! from `--token` or `MESSAGING_ADMIN_TOKEN`) for `health`, `dlq …` and `replay …`, and to a
//! broker directly for `tail`. `--json` prints the API's JSON for scripts. Exit status: 0
//! done, 1 the API refused or failed the request, 2 bad usage, 3 authentication failed, 4
//! the API or broker could not be reached.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use helix_messaging::SubscribeOptions;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "helixctl",
    version,
    about = "Operate helix-messaging from the shell"
)]
struct Cli {
    /// The admin API's address.
    #[arg(
        long,
        env = "HELIXCTL_URL",
        default_value = "http://127.0.0.1:7061",
        global = true
    )]
    url: String,
    /// The admin API's bearer token.
    #[arg(
        long,
        env = "MESSAGING_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Both sides' health.
    Health,
    /// The dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Replays of a topic's history.
    #[command(subcommand)]
    Replay(ReplayCommand),
    /// Print what is published to TOPIC, on the backend `--broker` or `MESSAGING_BACKEND`
    /// names, on a subscription of its own (it takes nothing from the consumer groups).
    Tail {
        /// The topic.
        topic: String,
        /// The broker URL (`memory://`, `redis://…`, `amqp://…`, `kafka://…`); else the
        /// backend from the environment.
        #[arg(long)]
        broker: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List entries (newest first), with the number matching in all.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// One entry, whole.
    Show { id: String },
    /// Publish an entry's message again (to its topic or `--target-topic`) and remove it.
    Reprocess {
        id: String,
        #[arg(long)]
        target_topic: Option<String>,
    },
    /// Mark an entry discarded (it stays listed, with the reason).
    Discard {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The entries grouped by reason and topic, largest group first.
    Groups {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Bulk redrive jobs.
    #[command(subcommand)]
    Redrive(RedriveCommand),
}

/// Which DLQ entries (every one unless narrowed).
#[derive(Debug, Args)]
struct FilterArgs {
    /// Only entries that failed on this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this reason (e.g. `permanent_failure`).
    #[arg(long)]
    reason: Option<String>,
    /// Only this status (`pending`, `parked`, `discarded`).
    #[arg(long)]
    status: Option<String>,
    /// Only messages of this type (their `type` header).
    #[arg(long = "type")]
    message_type: Option<String>,
}

impl FilterArgs {
    fn pairs(self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("topic", self.topic),
            ("reason", self.reason),
            ("status", self.status),
            ("type", self.message_type),
        ]
    }
}

#[derive(Debug, Subcommand)]
enum RedriveCommand {
    /// Start re-driving the selected entries; with `--wait`, follow the job with a progress
    /// bar.
    Start(RedriveArgs),
    /// A job's progress.
    Status { id: String },
    /// Ask a job to stop (what it re-drove stays re-driven).
    Cancel { id: String },
    /// Every job, newest first.
    List,
}

#[derive(Debug, Args)]
struct RedriveArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Publish there instead of each message's original topic.
    #[arg(long)]
    target_topic: Option<String>,
    /// Most messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Messages per published batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Re-drive this many first and watch them before the rest.
    #[arg(long)]
    canary: Option<usize>,
    /// How long to watch the canaries, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    canary_watch_ms: u64,
    /// Follow it until it finishes.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum ReplayCommand {
    /// Start a replay; with `--wait`, follow it to the end with a progress bar.
    Start(StartArgs),
    /// A replay's progress.
    Status { id: String },
    /// Ask a replay to stop.
    Cancel { id: String },
    /// Every replay, newest first.
    List,
}

#[derive(Debug, Args)]
struct StartArgs {
    /// The topic whose history is replayed.
    #[arg(long)]
    topic: String,
    /// Window start, RFC 3339 (`2026-01-01T00:00:00Z`).
    #[arg(long)]
    from: String,
    /// Window end (exclusive), RFC 3339.
    #[arg(long)]
    to: String,
    /// Where copies go (default `<topic>.replay`).
    #[arg(long)]
    target_topic: Option<String>,
    /// Only messages of these types (repeat it).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Count what would be replayed; publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// The replay's id (default a fresh one).
    #[arg(long)]
    id: Option<String>,
    /// Follow it until it finishes.
    #[arg(long)]
    wait: bool,
}

/// Why a command failed, and the exit status that says so.
#[derive(Debug)]
enum Failure {
    Api(String),
    Auth(String),
    Unreachable(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Api(_) => 1,
            Failure::Auth(_) => 3,
            Failure::Unreachable(_) => 4,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Api(m) | Failure::Auth(m) | Failure::Unreachable(m) => m,
        }
    }
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|err| {
            Failure::Unreachable(format!(
                "cannot reach the admin API at {}: {err}",
                self.base
            ))
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|err| {
            Failure::Unreachable(format!("the admin API's answer broke off: {err}"))
        })?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let message = || {
            body["error"]["message"]
                .as_str()
                .map_or_else(|| body.to_string(), str::to_owned)
        };
        match status.as_u16() {
            200..=299 => Ok(body),
            401 => Err(Failure::Auth(format!(
                "authentication failed ({}): check --token / MESSAGING_ADMIN_TOKEN",
                message()
            ))),
            // Health answers 503 with a body worth showing when a side is down.
            503 if path.ends_with("/health") && body.get("status").is_some() => Ok(body),
            code => Err(Failure::Api(format!("{code}: {}", message()))),
        }
    }

    async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

fn print(json_out: bool, value: &Value, text: impl FnOnce(&Value) -> String) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values serialize")
        );
    } else {
        println!("{}", text(value));
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

fn entry_line(e: &Value) -> String {
    format!(
        "{}  {}  {}  {}  attempts {}  {}",
        str_of(&e["id"]),
        str_of(&e["status"]),
        str_of(&e["original_topic"]),
        str_of(&e["reason"]),
        e["attempts"],
        str_of(&e["error"]),
    )
}

fn progress_line(p: &Value) -> String {
    format!(
        "{}  {}  {} -> {}  total {}  replayed {}  skipped {}  failed {}",
        str_of(&p["id"]),
        str_of(&p["status"]),
        str_of(&p["topic"]),
        str_of(&p["target_topic"]),
        p["total"],
        p["replayed"],
        p["skipped"],
        p["failed"],
    )
}

fn redrive_line(p: &Value) -> String {
    format!(
        "{}  {}  total {}  redriven {}  skipped {}  failed {}{}",
        str_of(&p["id"]),
        str_of(&p["status"]),
        p["total"],
        p["redriven"],
        p["skipped"],
        p["failed"],
        p["last_error"]
            .as_str()
            .map(|e| format!("  last error: {e}"))
            .unwrap_or_default(),
    )
}

/// `key=value` pairs for a query string, percent-encoded.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut url = reqwest::Url::parse("http://query.invalid/").expect("a valid URL");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
    }
    url.query().map(|q| format!("?{q}")).unwrap_or_default()
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Tail {
        topic,
        broker,
        count,
    } = &cli.command
    {
        return tail(topic, broker.as_deref(), *count, cli.json).await;
    }
    let token = cli.token.clone().filter(|t| !t.is_empty()).ok_or_else(|| {
        Failure::Auth("no token: pass --token or set MESSAGING_ADMIN_TOKEN".into())
    })?;
    let api = Api {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| Failure::Unreachable(err.to_string()))?,
        base: cli.url.clone(),
        token,
    };
    let json_out = cli.json;
    match cli.command {
        Command::Health => {
            let health = api.get("/v1/messaging/health").await?;
            print(json_out, &health, |h| {
                format!(
                    "{}\ntasks:  {} ({})\nevents: {} ({})",
                    str_of(&h["status"]),
                    str_of(&h["tasks"]["status"]),
                    str_of(&h["tasks"]["detail"]),
                    str_of(&h["events"]["status"]),
                    str_of(&h["events"]["detail"]),
                )
            });
            if health["status"] == "unhealthy" {
                return Err(Failure::Api("unhealthy".into()));
            }
        }
        Command::Dlq(DlqCommand::List {
            limit,
            offset,
            filter,
        }) => {
            let mut pairs = vec![
                ("limit", Some(limit.to_string())),
                ("offset", Some(offset.to_string())),
            ];
            pairs.extend(filter.pairs());
            let path = format!("/v1/messaging/dlq{}", query(&pairs));
            let page = api.get(&path).await?;
            print(json_out, &page, |p| {
                let mut out = format!("{} entries", p["count"]);
                for e in p["messages"].as_array().into_iter().flatten() {
                    out.push('\n');
                    out.push_str(&entry_line(e));
                }
                out
            });
        }
        Command::Dlq(DlqCommand::Show { id }) => {
            let entry = api.get(&format!("/v1/messaging/dlq/{id}")).await?;
            print(json_out, &entry, |e| {
                serde_json::to_string_pretty(e).expect("JSON values serialize")
            });
        }
        Command::Dlq(DlqCommand::Reprocess { id, target_topic }) => {
            let body = target_topic.map(|t| json!({ "target_topic": t }));
            let done = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/messaging/dlq/{id}/reprocess"),
                    body,
                )
                .await?;
            print(json_out, &done, |_| format!("{id} reprocessed"));
        }
        Command::Dlq(DlqCommand::Discard { id, reason }) => {
            let body = reason.map(|r| json!({ "reason": r }));
            let done = api
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/messaging/dlq/{id}/discard"),
                    body,
                )
                .await?;
            print(json_out, &done, |_| format!("{id} discarded"));
        }
        Command::Dlq(DlqCommand::Groups { filter }) => {
            let path = format!("/v1/messaging/dlq/groups{}", query(&filter.pairs()));
            let groups = api.get(&path).await?;
            print(json_out, &groups, |g| {
                let mut out = format!("{} groups", g["count"]);
                for group in g["groups"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:>6}  {}  {}  newest {}  {}",
                        group["count"].as_u64().unwrap_or(0),
                        str_of(&group["reason"]),
                        str_of(&group["topic"]),
                        str_of(&group["newest"]),
                        str_of(&group["sample_error"]),
                    ));
                }
                out
            });
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::Start(args))) => {
            let filter: serde_json::Map<String, Value> = args
                .filter
                .pairs()
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), json!(v))))
                .collect();
            let mut body = json!({ "filter": filter });
            if let Some(target) = args.target_topic {
                body["target_topic"] = json!(target);
            }
            if let Some(rate) = args.rate {
                body["rate_per_second"] = json!(rate);
            }
            if let Some(size) = args.batch_size {
                body["batch_size"] = json!(size);
            }
            if let Some(count) = args.canary {
                body["canary"] = json!({ "count": count, "watch_ms": args.canary_watch_ms });
            }
            let mut progress = api
                .call(
                    reqwest::Method::POST,
                    "/v1/messaging/dlq/redrives",
                    Some(body),
                )
                .await?;
            if args.wait {
                let path = format!("/v1/messaging/dlq/redrives/{}", str_of(&progress["id"]));
                progress = follow(&api, &path, "redrive", json_out).await?;
            }
            print(json_out, &progress, redrive_line);
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::Status { id })) => {
            let progress = api.get(&format!("/v1/messaging/dlq/redrives/{id}")).await?;
            print(json_out, &progress, redrive_line);
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::Cancel { id })) => {
            let progress = api
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/messaging/dlq/redrives/{id}"),
                    None,
                )
                .await?;
            print(json_out, &progress, redrive_line);
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::List)) => {
            let all = api.get("/v1/messaging/dlq/redrives").await?;
            print(json_out, &all, |a| {
                let mut out = format!("{} redrives", a["count"]);
                for p in a["redrives"].as_array().into_iter().flatten() {
                    out.push('\n');
                    out.push_str(&redrive_line(p));
                }
                out
            });
        }
        Command::Replay(ReplayCommand::Start(args)) => {
            let mut body = json!({
                "topic": args.topic,
                "from_time": args.from,
                "to_time": args.to,
                "filter": { "message_types": args.types },
                "options": { "dry_run": args.dry_run },
            });
            if let Some(id) = args.id {
                body["id"] = json!(id);
            }
            if let Some(target) = args.target_topic {
                body["target_topic"] = json!(target);
            }
            let mut progress = api
                .call(reqwest::Method::POST, "/v1/messaging/replay", Some(body))
                .await?;
            if args.wait {
                let path = format!("/v1/messaging/replay/{}", str_of(&progress["id"]));
                progress = follow(&api, &path, "replay", json_out).await?;
            }
            print(json_out, &progress, progress_line);
        }
        Command::Replay(ReplayCommand::Status { id }) => {
            let progress = api.get(&format!("/v1/messaging/replay/{id}")).await?;
            print(json_out, &progress, progress_line);
        }
        Command::Replay(ReplayCommand::Cancel { id }) => {
            let progress = api
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/messaging/replay/{id}"),
                    None,
                )
                .await?;
            print(json_out, &progress, progress_line);
        }
        Command::Replay(ReplayCommand::List) => {
            let all = api.get("/v1/messaging/replay").await?;
            print(json_out, &all, |a| {
                let mut out = format!("{} replays", a["count"]);
                for p in a["replays"].as_array().into_iter().flatten() {
                    out.push('\n');
                    out.push_str(&progress_line(p));
                }
                out
            });
        }
        Command::Tail { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// Poll the job at `path` (a replay or a redrive) until it finishes, drawing its percentage
/// (on stderr, and only on a terminal: scripts get the final progress alone).
async fn follow(api: &Api, path: &str, what: &str, json_out: bool) -> Result<Value, Failure> {
    let bar = if json_out {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(100)
    };
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} {what} {{msg}} [{{bar:30}}] {{pos}}%"))
            .expect("a valid template")
            .progress_chars("=> "),
    );
    loop {
        let progress = api.get(path).await?;
        bar.set_message(str_of(&progress["id"]).to_owned());
        let percent = progress["percentage"].as_f64().unwrap_or(0.0);
        bar.set_position(percent.clamp(0.0, 100.0) as u64);
        if progress["status"] != "running" && progress["status"] != "watching" {
            bar.finish_and_clear();
            return Ok(progress);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn tail(
    topic: &str,
    broker: Option<&str>,
    count: Option<usize>,
    json_out: bool,
) -> Result<(), Failure> {
    let connected = match broker {
        Some(url) => helix_messaging::connect(url).await,
        None => helix_messaging::from_env().await,
    };
    let broker = connected.map_err(|err| Failure::Unreachable(format!("the broker: {err}")))?;
    let mut subscription = broker
        .subscribe(topic, SubscribeOptions::default())
        .await
        .map_err(|err| Failure::Api(format!("subscribing to {topic}: {err}")))?;
    // Said on stderr, so a script reading stdout knows when to publish.
    eprintln!("tailing {topic} on {}", broker.name());
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            next = subscription.next() => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(item) = next else { break };
        let delivery = match item {
            Ok(delivery) => delivery,
            Err(err) => {
                eprintln!("{err}");
                continue;
            }
        };
        let m = delivery.message();
        let payload = String::from_utf8_lossy(m.payload());
        if json_out {
            println!(
                "{}",
                json!({ "id": m.id(), "key": m.key(), "headers": m.headers(), "payload": payload })
            );
        } else {
            println!("{}  {payload}", m.id());
        }
        let _ = delivery.ack().await;
        seen += 1;
    }
    let _ = broker.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("helixctl: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}
