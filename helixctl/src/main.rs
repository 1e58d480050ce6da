//! `helixctl`: operate helix-messaging from the shell.
//!
//! Talks to the admin API (`--url`, default `http://127.0.0.1:7061`, https with the public
//! roots and `--ca-cert`) for `health`, `dlq …` and `replay …`, reading its answers into the
//! admin API's own types (`helix_messaging_admin::api`), and to a broker directly for `tail`.
//! The bearer token comes from `--token`, `--token-file`, `MESSAGING_ADMIN_TOKEN` or
//! `MESSAGING_ADMIN_TOKEN_FILE`, in that order. `--json` prints the API's JSON for scripts,
//! and any failure as `{"error": {"status", "message"}}` on stderr. Exit status: 0 done, 1
//! the API refused or failed the request, 2 bad usage, 3 authentication failed, 4 the API or
//! broker could not be reached. Logs go to stderr, off unless `RUST_LOG`, `LOG_LEVEL` or
//! `MESSAGING_DEBUG` ask for them.

mod cli;
mod client;
mod output;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clap::error::ErrorKind;
use futures::StreamExt;
use helix_messaging::SubscribeOptions;
use helix_messaging::logging::log_directives;
use helix_messaging_admin::api::{
    Ack, CanaryBody, DiscardBody, Entry, Groups, Health, Page, Queues, Redrive, RedriveBody,
    RedrivePreview, Redrives, Replay, ReplayBody, ReplayFilterBody, ReplayOptionsBody, Replays,
    ReprocessBody,
};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cli::{Cli, Command, DlqCommand, RedriveArgs, RedriveCommand, ReplayCommand, StartArgs};
use crate::client::{Api, Failure, query, segment};
use crate::output::{
    entry_line, group_line, health_text, list_text, pretty, print, queue_line, redrive_line,
    replay_line, report,
};

/// The path of the DLQ entry `id`, with `suffix` after it.
fn dlq_path(id: &str, suffix: &str) -> Result<String, Failure> {
    Ok(format!("/v1/messaging/dlq/{}{suffix}", segment(id)?))
}

fn redrive_path(id: &str) -> Result<String, Failure> {
    Ok(format!("/v1/messaging/dlq/redrives/{}", segment(id)?))
}

fn replay_path(id: &str) -> Result<String, Failure> {
    Ok(format!("/v1/messaging/replay/{}", segment(id)?))
}

/// A request body of a typed contract struct.
fn body_of(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("the API's types serialize")
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
    let token = client::token(cli.token, cli.token_file.as_deref(), |var| {
        std::env::var(var).ok()
    })?;
    let api = Api::new(cli.url, token, cli.ca_cert.as_deref())?;
    let json_out = cli.json;
    match cli.command {
        Command::Health => {
            let health: Health = api.get("/v1/messaging/health").await?;
            print(json_out, &health, health_text);
            if health.status == "unhealthy" {
                return Err(Failure::Api {
                    status: Some(503),
                    message: "unhealthy".into(),
                });
            }
        }
        Command::Queues { topic, group, side } => {
            let pairs = [("topic", topic), ("group", group), ("side", side)];
            let path = format!("/v1/messaging/queues{}", query(&pairs));
            let queues: Queues = api.get(&path).await?;
            print(json_out, &queues, |q| {
                list_text(q.count, "queues", &q.queues, queue_line)
            });
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
            let page: Page<'static> = api.get(&path).await?;
            print(json_out, &page, |p| {
                list_text(p.count, "entries", &p.messages, entry_line)
            });
        }
        Command::Dlq(DlqCommand::Show { id }) => {
            let entry: Entry<'static> = api.get(&dlq_path(&id, "")?).await?;
            print(json_out, &entry, pretty);
        }
        Command::Dlq(DlqCommand::Reprocess { id, target_topic }) => {
            let body = target_topic.map(|t| {
                body_of(&ReprocessBody {
                    target_topic: Some(t),
                })
            });
            let done: Ack = api
                .call(Method::POST, &dlq_path(&id, "/reprocess")?, body)
                .await?;
            print(json_out, &done, |_| format!("{id} reprocessed"));
        }
        Command::Dlq(DlqCommand::Discard { id, reason }) => {
            let body = reason.map(|r| body_of(&DiscardBody { reason: Some(r) }));
            let done: Ack = api
                .call(Method::DELETE, &dlq_path(&id, "/discard")?, body)
                .await?;
            print(json_out, &done, |_| format!("{id} discarded"));
        }
        Command::Dlq(DlqCommand::Groups { filter }) => {
            let path = format!("/v1/messaging/dlq/groups{}", query(&filter.pairs()));
            let groups: Groups<'static> = api.get(&path).await?;
            print(json_out, &groups, |g| {
                list_text(g.count, "groups", &g.groups, group_line)
            });
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::Start(args))) => {
            let wait = args.wait;
            let body = redrive_body(args)?;
            if body.dry_run {
                let preview: RedrivePreview<'static> = api
                    .call(
                        Method::POST,
                        "/v1/messaging/dlq/redrives",
                        Some(body_of(&body)),
                    )
                    .await?;
                print(json_out, &preview, |p| {
                    list_text(
                        format!("dry run: {} entries would be re-driven, in", p.total),
                        "groups",
                        &p.groups,
                        group_line,
                    )
                });
                return Ok(());
            }
            let mut progress: Redrive = api
                .call(
                    Method::POST,
                    "/v1/messaging/dlq/redrives",
                    Some(body_of(&body)),
                )
                .await?;
            if wait {
                progress = follow(
                    &api,
                    &redrive_path(&progress.id)?,
                    "redrive",
                    json_out,
                    |p: &Redrive| (p.id.clone(), p.percentage, p.is_active()),
                )
                .await?;
            }
            print(json_out, &progress, redrive_line);
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::Status { id })) => {
            let progress: Redrive = api.get(&redrive_path(&id)?).await?;
            print(json_out, &progress, redrive_line);
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::Cancel { id })) => {
            let progress: Redrive = api.call(Method::DELETE, &redrive_path(&id)?, None).await?;
            print(json_out, &progress, redrive_line);
        }
        Command::Dlq(DlqCommand::Redrive(RedriveCommand::List)) => {
            let all: Redrives = api.get("/v1/messaging/dlq/redrives").await?;
            print(json_out, &all, |a| {
                list_text(a.count, "redrives", &a.redrives, redrive_line)
            });
        }
        Command::Replay(ReplayCommand::Start(args)) => {
            let wait = args.wait;
            let mut progress: Replay = api
                .call(
                    Method::POST,
                    "/v1/messaging/replay",
                    Some(body_of(&replay_body(args))),
                )
                .await?;
            if wait {
                progress = follow(
                    &api,
                    &replay_path(&progress.id)?,
                    "replay",
                    json_out,
                    |p: &Replay| (p.id.clone(), p.percentage, p.is_active()),
                )
                .await?;
            }
            print(json_out, &progress, replay_line);
        }
        Command::Replay(ReplayCommand::Status { id }) => {
            let progress: Replay = api.get(&replay_path(&id)?).await?;
            print(json_out, &progress, replay_line);
        }
        Command::Replay(ReplayCommand::Cancel { id }) => {
            let progress: Replay = api.call(Method::DELETE, &replay_path(&id)?, None).await?;
            print(json_out, &progress, replay_line);
        }
        Command::Replay(ReplayCommand::List) => {
            let all: Replays = api.get("/v1/messaging/replay").await?;
            print(json_out, &all, |a| {
                list_text(a.count, "replays", &a.replays, replay_line)
            });
        }
        Command::Tail { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// The body of `POST /v1/messaging/dlq/redrives`. Without a filter flag it takes `--all`:
/// re-driving the whole DLQ is never the result of a forgotten flag.
fn redrive_body(args: RedriveArgs) -> Result<RedriveBody, Failure> {
    let filter: BTreeMap<String, String> = args
        .filter
        .pairs()
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect();
    if filter.is_empty() && !args.all {
        return Err(Failure::Usage(
            "dlq redrive start: no filter flag (--topic, --reason, --status, --type) narrows \
             the selection; pass --all to re-drive every entry of the DLQ (--dry-run shows \
             what it would take)"
                .into(),
        ));
    }
    Ok(RedriveBody {
        filter,
        all: args.all,
        dry_run: args.dry_run,
        id: args.id,
        target_topic: args.target_topic,
        rate_per_second: args.rate,
        canary: args.canary.map(|count| CanaryBody {
            count,
            watch_ms: args.canary_watch_ms,
        }),
        batch_size: args.batch_size,
    })
}

/// The body of `POST /v1/messaging/replay`.
fn replay_body(args: StartArgs) -> ReplayBody {
    ReplayBody {
        id: args.id,
        topic: args.topic,
        from_time: args.from,
        to_time: args.to,
        target_topic: args.target_topic,
        filter: ReplayFilterBody {
            message_types: args.types,
            headers: BTreeMap::new(),
        },
        options: ReplayOptionsBody {
            dry_run: args.dry_run,
            ..ReplayOptionsBody::default()
        },
    }
}

/// Poll the job at `path` (a replay or a redrive) until it finishes, drawing its percentage
/// (on stderr, and only on a terminal: scripts get the final progress alone). `state` gives
/// a progress's id, percentage and whether it is still going.
async fn follow<T: DeserializeOwned>(
    api: &Api,
    path: &str,
    what: &str,
    json_out: bool,
    state: impl Fn(&T) -> (String, f64, bool),
) -> Result<T, Failure> {
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
        let progress: T = api.get(path).await?;
        let (id, percent, active) = state(&progress);
        bar.set_message(id);
        bar.set_position(percent.clamp(0.0, 100.0) as u64);
        if !active {
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
        .map_err(|err| Failure::api(format!("subscribing to {topic}: {err}")))?;
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
    // Known before parsing, so a usage error under --json is JSON too.
    let json_out = std::env::args_os().any(|arg| arg == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if json_out
                && !matches!(
                    err.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                ) =>
        {
            let text = err.render().to_string();
            let message = text.trim().trim_start_matches("error: ");
            report(true, &Failure::Usage(message.to_owned()));
            return ExitCode::from(2);
        }
        Err(err) => err.exit(),
    };
    // Quiet unless asked: scripts read stderr for the error report.
    let directives = match log_directives(|var| std::env::var(var).ok(), "off") {
        Ok(directives) => directives,
        Err(err) => {
            report(json_out, &Failure::Usage(err.to_string()));
            return ExitCode::from(2);
        }
    };
    match tracing_subscriber::EnvFilter::try_new(&directives) {
        Ok(filter) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        Err(err) => {
            let message = format!("RUST_LOG: not a log filter: {err}");
            report(json_out, &Failure::Usage(message));
            return ExitCode::from(2);
        }
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            report(json_out, &failure);
            ExitCode::from(failure.exit_code())
        }
    }
}
