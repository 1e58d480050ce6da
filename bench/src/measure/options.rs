//! Command-line options shared by every scenario, and what they choose: the shape a
//! comparison drives both sides in, the raw baseline, and which comparisons run.

/// Command-line options shared by every scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) messages: usize,
    pub(crate) size: usize,
    pub(crate) runs: usize,
    /// Whether `--messages` was given (scenarios have different defaults).
    pub(crate) messages_given: bool,
    /// Only comparisons whose name contains this run (`--filter`).
    pub(crate) filter: Option<String>,
    /// `--peak`: each side at its best instead of like for like at batches of 100 (see
    /// [`Shape`]), plus many concurrent `publish` callers against the raw client's peak.
    pub(crate) peak: bool,
    /// `--side adapter|raw`: run one side only, for a profiler (no ratio is printed).
    pub(crate) side: Option<Side>,
    /// `--baseline like|minimal`: compare against one raw baseline only.
    pub(crate) baseline: Option<Baseline>,
    /// `--chunk N`: the adapter's `publish_batch` calls carry N messages each instead of the
    /// shape's (see [`Batching`]).
    pub(crate) chunk: Option<usize>,
    /// `--prefetch N`: the adapter's subscriptions hold up to N unsettled deliveries instead
    /// of the shape's (the raw clients have no such window).
    pub(crate) prefetch: Option<usize>,
}

/// One side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Adapter,
    Raw,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Options {
            messages: 1_000_000,
            size: 256,
            runs: 3,
            messages_given: false,
            filter: None,
            peak: false,
            side: None,
            baseline: None,
            chunk: None,
            prefetch: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--peak" {
                options.peak = true;
                continue;
            }
            if flag == "--side" {
                options.side = match it.next().map(String::as_str) {
                    Some("adapter") => Some(Side::Adapter),
                    Some("raw") => Some(Side::Raw),
                    _ => return Err("--side needs adapter or raw".into()),
                };
                continue;
            }
            if flag == "--baseline" {
                options.baseline = match it.next().map(String::as_str) {
                    Some("like") => Some(Baseline::LikeForLike),
                    Some("minimal") => Some(Baseline::Minimal),
                    Some("owned") => Some(Baseline::Owned),
                    _ => return Err("--baseline needs like, minimal or owned".into()),
                };
                continue;
            }
            if flag == "--filter" {
                let value = it.next().ok_or("--filter needs a value")?;
                options.filter = Some(value.clone());
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .replace('_', "");
            let number: usize = value
                .parse()
                .map_err(|_| format!("{flag}: expected a whole number, got {value:?}"))?;
            match flag.as_str() {
                "--messages" => {
                    options.messages = number.max(1);
                    options.messages_given = true;
                }
                "--size" => options.size = number.max(8),
                "--runs" => options.runs = number.max(1),
                "--chunk" => options.chunk = Some(number.max(1)),
                "--prefetch" => options.prefetch = Some(number.max(1)),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(options)
    }

    /// These options with `messages` as the count unless `--messages` was given.
    pub(crate) fn default_messages(&self, messages: usize) -> Options {
        Options {
            messages: if self.messages_given {
                self.messages
            } else {
                messages
            },
            ..self.clone()
        }
    }
}

/// How a comparison drives both sides: messages handed over before their acknowledgements
/// are awaited (`publish_batch` size, pipeline depth, confirms or delivery reports in
/// flight), deliveries a consumer may hold, and acks in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) batch: usize,
    /// Messages per `publish_batch` call within a batch (see [`Batching`]).
    pub(crate) chunk: usize,
    pub(crate) prefetch: usize,
    pub(crate) acks_in_flight: usize,
}

/// How the adapter hands over a window of messages before awaiting their acknowledgements:
/// in `publish_batch` calls of `chunk`, each started as soon as it is built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    pub(crate) window: usize,
    pub(crate) chunk: usize,
}

impl Batching {
    /// One `publish_batch` call per window of `size`.
    pub(crate) const fn whole(size: usize) -> Batching {
        Batching {
            window: size,
            chunk: size,
        }
    }
}

/// How a publish-only run publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// A window of messages handed over, then its acknowledgements awaited
    /// ([`Shape::batch`], on the adapter in `publish_batch` calls of [`Shape::chunk`]).
    Batches,
    /// [`PEAK_CALLERS`] tasks, each awaiting one acknowledgement at a time.
    Callers,
    /// The adapter's `PublishWindow`, one `send` per message with [`Shape::batch`] in
    /// flight; the raw client publishes as in [`Pattern::Batches`], at its best.
    Window,
}

/// Concurrent `publish` callers in peak mode (the 256 tasks).
pub(crate) const PEAK_CALLERS: usize = 256;

impl Shape {
    /// The like-for-like shape with `prefetch`: batches of 100, 64 acks in flight.
    pub(crate) const fn like_for_like(prefetch: usize) -> Shape {
        Shape {
            batch: 100,
            chunk: 100,
            prefetch,
            acks_in_flight: 64,
        }
    }

    /// `normal` unless `options.peak`, then `peak`; with `--chunk`, that many messages per
    /// `publish_batch` call (at most a batch).
    pub(crate) fn pick(options: &Options, normal: Shape, peak: Shape) -> Shape {
        let shape = if options.peak { peak } else { normal };
        Shape {
            chunk: options.chunk.unwrap_or(shape.chunk).clamp(1, shape.batch),
            prefetch: options.prefetch.unwrap_or(shape.prefetch),
            ..shape
        }
    }

    /// How the adapter publishes a batch.
    pub(crate) fn batching(&self) -> Batching {
        Batching {
            window: self.batch,
            chunk: self.chunk,
        }
    }
}

/// The publish and end-to-end comparisons every broker runs; at peak also the adapter's
/// concurrent `publish` callers against as many raw callers, each awaiting its own
/// acknowledgement (scenario 2), and the adapter's `PublishWindow` against the raw client's
/// best publishing (scenario 3).
pub(crate) fn scenarios(options: &Options) -> &'static [&'static str] {
    if options.peak {
        &[
            "publish",
            "end to end",
            "publish, 256 callers",
            "publish, window",
        ]
    } else {
        &["publish", "end to end"]
    }
}

/// The publishing pattern of scenario `scenario` of [`scenarios`] (0, 2 or 3).
pub(crate) fn pattern(scenario: usize) -> Pattern {
    match scenario {
        2 => Pattern::Callers,
        3 => Pattern::Window,
        _ => Pattern::Batches,
    }
}

/// What the raw side of a comparison carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Baseline {
    /// The metadata the adapter carries per message (and, where it matters, its queue
    /// arguments): the ratio is the adapter's own overhead, the target's comparison.
    LikeForLike,
    /// Bare payloads: the ratio adds what the metadata costs.
    Minimal,
    /// Like for like, and the raw consumer hands each record, copied out of the client, from
    /// a reading task to the application's task, as the adapter's subscriptions hand over
    /// owned deliveries: what that ownership costs, paid on the raw side too. Kafka's end to
    /// end only, and only when asked for (`--baseline owned`).
    Owned,
}

impl Baseline {
    /// Whether the raw side's messages carry the adapter's metadata (id and timestamp).
    pub(crate) fn carries_metadata(self) -> bool {
        matches!(self, Baseline::LikeForLike | Baseline::Owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn side_picks_one_side_and_refuses_anything_else() {
        let options = Options::parse(&args(&["--side", "adapter", "--runs", "2"])).unwrap();
        assert_eq!(options.side, Some(Side::Adapter));
        assert_eq!(options.runs, 2);
        let options = Options::parse(&args(&["--side", "raw"])).unwrap();
        assert_eq!(options.side, Some(Side::Raw));
        assert!(Options::parse(&args(&["--side", "both"])).is_err());
        assert_eq!(Options::parse(&[]).unwrap().side, None);
    }

    #[test]
    fn baseline_picks_one_raw_baseline_and_refuses_anything_else() {
        let options = Options::parse(&args(&["--baseline", "like"])).unwrap();
        assert_eq!(options.baseline, Some(Baseline::LikeForLike));
        let options = Options::parse(&args(&["--baseline", "minimal"])).unwrap();
        assert_eq!(options.baseline, Some(Baseline::Minimal));
        let options = Options::parse(&args(&["--baseline", "owned"])).unwrap();
        assert_eq!(options.baseline, Some(Baseline::Owned));
        assert!(Baseline::Owned.carries_metadata() && !Baseline::Minimal.carries_metadata());
        assert!(Options::parse(&args(&["--baseline", "both"])).is_err());
        assert_eq!(Options::parse(&[]).unwrap().baseline, None);
    }

    #[test]
    fn chunk_sets_the_messages_per_publish_batch_call_up_to_a_batch() {
        let peak = Shape {
            batch: 10_000,
            chunk: 1_000,
            prefetch: 10,
            acks_in_flight: 1,
        };
        let pick = |list: &[&str]| {
            let options = Options::parse(&args(list)).unwrap();
            Shape::pick(&options, Shape::like_for_like(10), peak).batching()
        };
        let default = pick(&["--peak"]);
        assert_eq!((default.window, default.chunk), (10_000, 1_000));
        let given = pick(&["--peak", "--chunk", "250"]);
        assert_eq!((given.window, given.chunk), (10_000, 250));
        let whole = pick(&["--peak", "--chunk", "50000"]);
        assert_eq!((whole.window, whole.chunk), (10_000, 10_000));
        let like = pick(&["--chunk", "250"]);
        assert_eq!((like.window, like.chunk), (100, 100));
        assert!(Options::parse(&args(&["--chunk", "many"])).is_err());
    }

    #[test]
    fn prefetch_overrides_the_shapes_window() {
        let shape = |list: &[&str]| {
            let options = Options::parse(&args(list)).unwrap();
            Shape::pick(&options, Shape::like_for_like(10), Shape::like_for_like(20)).prefetch
        };
        assert_eq!(shape(&[]), 10);
        assert_eq!(shape(&["--peak"]), 20);
        assert_eq!(shape(&["--peak", "--prefetch", "100"]), 100);
        assert_eq!(shape(&["--prefetch", "0"]), 1, "at least one");
    }
}
