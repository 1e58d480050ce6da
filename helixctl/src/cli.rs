//! The command line: every command, flag and its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// How the token and the JSON errors are found and written, shown after `--help`'s options.
const AFTER_HELP: &str = "\
The bearer token, by precedence: --token or --token-file (never both), then the \
environment's MESSAGING_ADMIN_TOKEN, then the file MESSAGING_ADMIN_TOKEN_FILE names. A token \
file's surrounding whitespace and newline are trimmed.

https: the server's certificate is checked against the usual public roots, and against \
--ca-cert (or MESSAGING_ADMIN_CA_CERT), a PEM file of the CA that issued a self-signed or \
private certificate.

With --json, stdout holds the answer's JSON; a failure prints nothing there and \
{\"error\": {\"status\": …, \"message\": …}} on stderr, status being the HTTP status or null \
when there was no HTTP answer.

Exit status: 0 done, 1 the API refused or failed the request, 2 bad usage, 3 authentication \
failed, 4 the API or broker could not be reached.";

/// `helixctl`'s arguments.
#[derive(Debug, Parser)]
#[command(
    name = "helixctl",
    version,
    about = "Operate helix-messaging from the shell",
    after_help = AFTER_HELP
)]
pub(crate) struct Cli {
    /// The admin API's address (http:// or https://).
    #[arg(
        long,
        env = "HELIXCTL_URL",
        default_value = "http://127.0.0.1:7061",
        global = true
    )]
    pub(crate) url: String,
    /// The admin API's bearer token (beats MESSAGING_ADMIN_TOKEN and
    /// MESSAGING_ADMIN_TOKEN_FILE; a command line is visible to other local users, a file
    /// is not).
    #[arg(long, global = true, conflicts_with = "token_file")]
    pub(crate) token: Option<String>,
    /// A file holding the bearer token (beats MESSAGING_ADMIN_TOKEN and
    /// MESSAGING_ADMIN_TOKEN_FILE).
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
    /// A PEM file of the CA certificate(s) to trust for an https admin API, besides the
    /// public roots.
    #[arg(
        long,
        env = "MESSAGING_ADMIN_CA_CERT",
        global = true,
        value_name = "PEM"
    )]
    pub(crate) ca_cert: Option<PathBuf>,
    /// Print JSON instead of text (errors too, on stderr).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Both sides' health.
    Health,
    /// The consumer groups of the hub's topics, named as the broker's own tools name them
    /// (the RabbitMQ queue `<topic>.<group>`, the Kafka consumer group, the Redis stream
    /// group), with their backlog. Every group the hub knows of, or TOPIC's.
    Queues {
        /// Only this topic (a task queue's name for tasks); one the hub knows nothing of is
        /// shown with the group it would have.
        topic: Option<String>,
        /// Only this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// Only this side.
        #[arg(long, value_parser = ["tasks", "events"])]
        side: Option<String>,
    },
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

/// `helixctl dlq …`.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List entries (oldest first, so paging with --offset is stable while new ones
    /// arrive), with the number matching in all.
    List {
        /// Entries per page (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Entries to skip.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// One entry, whole.
    Show {
        /// The entry's id.
        id: String,
    },
    /// Publish an entry's message again (to its topic or `--target-topic`) and remove it.
    Reprocess {
        /// The entry's id.
        id: String,
        /// Publish there instead of the topic it failed on.
        #[arg(long)]
        target_topic: Option<String>,
    },
    /// Mark an entry discarded (it stays listed, with the reason).
    Discard {
        /// The entry's id.
        id: String,
        /// Why (kept with the entry).
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
pub(crate) struct FilterArgs {
    /// Only entries that failed on this topic.
    #[arg(long)]
    pub(crate) topic: Option<String>,
    /// Only this reason (e.g. `permanent_failure`).
    #[arg(long)]
    pub(crate) reason: Option<String>,
    /// Only this status (`pending`, `parked`, `discarded`).
    #[arg(long)]
    pub(crate) status: Option<String>,
    /// Only messages of this type (their `type` header).
    #[arg(long = "type")]
    pub(crate) message_type: Option<String>,
}

impl FilterArgs {
    /// The filter as the API's keys, each with its value when given.
    pub(crate) fn pairs(self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("topic", self.topic),
            ("reason", self.reason),
            ("status", self.status),
            ("type", self.message_type),
        ]
    }
}

/// `helixctl dlq redrive …`.
#[derive(Debug, Subcommand)]
pub(crate) enum RedriveCommand {
    /// Start re-driving the selected entries (a filter flag, or --all for every entry);
    /// with `--wait`, follow the job with a progress bar.
    Start(RedriveArgs),
    /// A job's progress.
    Status {
        /// The job's id.
        id: String,
    },
    /// Ask a job to stop (what it re-drove stays re-driven).
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Every job, newest first.
    List,
}

/// `helixctl dlq redrive start`'s flags.
#[derive(Debug, Args)]
pub(crate) struct RedriveArgs {
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Re-drive every entry of the DLQ: needed when no filter flag narrows the selection,
    /// so the whole DLQ is never re-driven by a forgotten flag.
    #[arg(long, conflicts_with_all = ["topic", "reason", "status", "message_type"])]
    pub(crate) all: bool,
    /// Show how many entries it would take, grouped by reason and topic; start nothing.
    #[arg(long, conflicts_with = "wait")]
    pub(crate) dry_run: bool,
    /// The job's id (a new UUID otherwise); one already in use is refused.
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// Publish there instead of each message's original topic.
    #[arg(long)]
    pub(crate) target_topic: Option<String>,
    /// Most messages per second (the server's default, 100, otherwise).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Messages per published batch.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Re-drive this many first and watch them before the rest.
    #[arg(long)]
    pub(crate) canary: Option<usize>,
    /// How long to watch the canaries, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) canary_watch_ms: u64,
    /// Follow it until it finishes.
    #[arg(long)]
    pub(crate) wait: bool,
}

/// `helixctl replay …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ReplayCommand {
    /// Start a replay; with `--wait`, follow it to the end with a progress bar.
    Start(StartArgs),
    /// A replay's progress.
    Status {
        /// The replay's id.
        id: String,
    },
    /// Ask a replay to stop.
    Cancel {
        /// The replay's id.
        id: String,
    },
    /// Every replay, newest first.
    List,
}

/// `helixctl replay start`'s flags.
#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// The topic whose history is replayed.
    #[arg(long)]
    pub(crate) topic: String,
    /// Window start, RFC 3339 (`2026-01-01T00:00:00Z`).
    #[arg(long)]
    pub(crate) from: String,
    /// Window end (exclusive), RFC 3339.
    #[arg(long)]
    pub(crate) to: String,
    /// Where copies go (default `<topic>.replay`).
    #[arg(long)]
    pub(crate) target_topic: Option<String>,
    /// Only messages of these types (repeat it).
    #[arg(long = "type")]
    pub(crate) types: Vec<String>,
    /// Count what would be replayed; publish nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// The replay's id (default a fresh one).
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// Follow it until it finishes.
    #[arg(long)]
    pub(crate) wait: bool,
}
