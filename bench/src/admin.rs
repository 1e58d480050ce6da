//! The admin API under load: 50 concurrent clients listing a DLQ of 10,000 entries over real
//! HTTP, against the same listing called on the DLQ processor directly by 50 tasks (what the
//! HTTP layer, JSON and auth add), with the memory store and with the SQLite store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging::Broker;
use helix_messaging::admin::{AdminConfig, Services};
use helix_messaging::dlq::{
    DeadLetterFilter, DeadLetterStore, MemoryDeadLetterStore, Processor, ProcessorConfig,
    SqliteDeadLetterStore,
};
use helix_messaging::hub::{Hub, HubConfig};
use helix_messaging::memory::MemoryBroker;

use crate::layers::letters;
use crate::leftovers::fresh;
use crate::measure::{Options, Run, histogram, in_tasks, median};

const CLIENTS: usize = 50;
const PAGE: usize = 50;
const TOKEN: &str = "bench-admin-token";

/// `run` as requests per second with its latencies (`Run::messages` counts requests).
fn line(run: &Run, label: &str) -> String {
    let ms = |ns: u64| ns as f64 / 1e6;
    format!(
        "{label:<34} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   ({} requests in {:.3} s)",
        run.rate(),
        ms(run.latency.value_at_quantile(0.50)),
        ms(run.latency.value_at_quantile(0.99)),
        ms(run.latency.max()),
        run.messages,
        run.elapsed.as_secs_f64()
    )
}

/// The page client `client` asks for on its `i`-th request: clients walk the whole DLQ from
/// different starting pages, so no page is served from one client's cache of another.
fn offset(entries: usize, client: usize, i: usize) -> usize {
    let pages = entries.div_ceil(PAGE).max(1);
    ((client * 7 + i) % pages) * PAGE
}

/// A processor over `store` holding `entries` dead letters.
async fn filled(store: Arc<dyn DeadLetterStore>, entries: usize, size: usize) -> Processor {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let processor = Processor::new(
        broker,
        store,
        ProcessorConfig {
            auto_redrive: false,
            ..ProcessorConfig::default()
        },
    )
    .expect("processor");
    for letter in letters(entries, size, &fresh("admin-dlq")) {
        assert!(processor.ingest(letter).await.expect("ingest"));
    }
    processor
}

/// `CLIENTS` concurrent callers of `call`, `per_client` calls each; every call's latency.
async fn load<F, Fut>(per_client: usize, call: F) -> Run
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let latency = in_tasks(CLIENTS, CLIENTS * per_client, |client, count| {
        let call = call.clone();
        async move {
            let mut latency = histogram();
            for i in 0..count {
                let sent = Instant::now();
                call(client, i).await;
                latency.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            latency
        }
    })
    .await;
    Run {
        messages: CLIENTS * per_client,
        elapsed: started.elapsed(),
        latency,
    }
}

/// `GET /v1/messaging/dlq?limit=50&offset=…` from 50 clients, each on its own connection.
async fn over_http(processor: &Processor, entries: usize, per_client: usize) -> Run {
    let hub = Hub::new(
        HubConfig::default(),
        Arc::new(MemoryBroker::new()),
        Arc::new(MemoryBroker::new()),
        None,
    )
    .await
    .expect("hub");
    let config = AdminConfig::new(TOKEN).expect("admin config");
    let services = Services::new(hub).with_dlq(processor.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let addr: SocketAddr = listener.local_addr().expect("address");
    // The transport `serve` runs in production: its timeouts, limits and audit layers are
    // part of what is measured.
    let server = tokio::spawn(helix_messaging::admin::serve_listener(
        listener,
        config,
        services,
        std::future::pending(),
    ));
    let clients: Arc<Vec<reqwest::Client>> = Arc::new(
        (0..CLIENTS)
            .map(|_| {
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("client")
            })
            .collect(),
    );
    let expected_count = format!("\"count\":{entries}");
    let run = load(per_client, move |client, i| {
        let (clients, expected_count) = (clients.clone(), expected_count.clone());
        async move {
            let url = format!(
                "http://{addr}/v1/messaging/dlq?limit={PAGE}&offset={}",
                offset(entries, client, i)
            );
            let response = clients[client]
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 200);
            let body = response.text().await.expect("body");
            assert!(
                body.contains(&expected_count),
                "the listing's count: {body:.200}"
            );
        }
    })
    .await;
    server.abort();
    run
}

/// The same pages from `Processor::list` in 50 tasks: the listing without HTTP, with the
/// filter the API lists with (discarded entries left out).
async fn direct(processor: &Processor, entries: usize, per_client: usize) -> Run {
    let processor = processor.clone();
    let filter = DeadLetterFilter {
        exclude_discarded: true,
        ..DeadLetterFilter::default()
    };
    load(per_client, move |client, i| {
        let (processor, filter) = (processor.clone(), filter.clone());
        async move {
            let page = processor
                .list(&filter, PAGE, offset(entries, client, i))
                .await
                .expect("list");
            assert_eq!(page.count as usize, entries);
            assert_eq!(page.entries.len(), PAGE.min(entries));
        }
    })
    .await
}

async fn compare_store(label: &str, processor: &Processor, options: &Options, per_client: usize) {
    let entries = options.messages;
    let (mut http, mut raw) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let d = direct(processor, entries, per_client).await;
        println!(
            "run {run}: {}",
            line(&d, &format!("{label}: Processor::list"))
        );
        raw.push(d);
        let h = over_http(processor, entries, per_client).await;
        println!(
            "run {run}: {}",
            line(&h, &format!("{label}: GET /v1/messaging/dlq"))
        );
        http.push(h);
    }
    let (raw, http) = (median(raw), median(http));
    println!("median of runs:");
    println!("  {}", line(&raw, &format!("{label}: Processor::list")));
    println!(
        "  {}",
        line(&http, &format!("{label}: GET /v1/messaging/dlq"))
    );
    println!(
        "  ratio HTTP / direct: {:.2}x; p99 over HTTP {:.2} ms",
        http.rate() / raw.rate(),
        http.latency.value_at_quantile(0.99) as f64 / 1e6
    );
}

/// `admin-dlq`: the DLQ listing under 50 concurrent clients.
pub(crate) async fn compare(options: &Options) {
    let per_client = 40;
    println!(
        "admin DLQ listing: {} entries x {} B, {CLIENTS} concurrent clients x {per_client} requests (limit {PAGE}), {} runs each",
        options.messages, options.size, options.runs
    );
    let memory = filled(
        Arc::new(MemoryDeadLetterStore::new()),
        options.messages,
        options.size,
    )
    .await;
    compare_store("memory store", &memory, options, per_client).await;

    let dir = std::env::temp_dir().join(format!("helix-bench-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = SqliteDeadLetterStore::open(dir.join("dlq.sqlite"))
        .await
        .expect("sqlite");
    let started = Instant::now();
    let sqlite = filled(Arc::new(store), options.messages, options.size).await;
    println!(
        "(filled the SQLite store in {:.1} s, one durable commit per entry)",
        started.elapsed().as_secs_f64()
    );
    compare_store("SQLite store", &sqlite, options, per_client).await;
    let _ = std::fs::remove_dir_all(&dir);
}
