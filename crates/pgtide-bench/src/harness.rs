//! The measuring machinery every case shares: measured windows after a warm-up, sides of a
//! comparison alternating in rounds, and how a failing or panicking task stops a run (a panic is
//! carried up as [`Failure::Panic`] and resumed only after the namespace is dropped).

use std::any::Any;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinSet};

use super::Bench;
use pgtide::{Error, Result};

/// Why a phase stopped: an error to report, or a panic to resume once the namespace is dropped.
pub(super) enum Failure {
    Error(Error),
    Panic(Box<dyn Any + Send>),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Error(e.into())
    }
}

pub(super) type Step<T> = std::result::Result<T, Failure>;

/// The result of a bench task: its error, or its panic carried up as a [`Failure`].
pub(super) fn joined<T>(result: std::result::Result<Result<T>, JoinError>) -> Step<T> {
    match result {
        Ok(r) => Ok(r?),
        Err(e) if e.is_panic() => Err(Failure::Panic(e.into_panic())),
        Err(e) => Err(Failure::Panic(Box::new(format!(
            "bench task ended early: {e}"
        )))),
    }
}

/// Items done in a measured window (or the sum of several).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Throughput {
    pub items: u64,
    pub secs: f64,
    /// A worker found nothing left to do before the window ended.
    pub exhausted: bool,
}

impl Throughput {
    pub(super) fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.items as f64 / self.secs
        } else {
            0.0
        }
    }

    pub(super) fn exhausted_note(&self, what: &str) -> Option<String> {
        self.exhausted.then(|| {
            format!(
                "{what} ran out after {:.2} s measured: rate up to the last batch ({} items)",
                self.secs, self.items
            )
        })
    }
}

/// What the rounds of one side of a comparison add up to.
pub(super) trait Accumulate: Default {
    fn add(&mut self, round: Self);
}

impl Accumulate for Throughput {
    fn add(&mut self, round: Self) {
        self.items += round.items;
        self.secs += round.secs;
        self.exhausted |= round.exhausted;
    }
}

impl Accumulate for Vec<Duration> {
    fn add(&mut self, round: Self) {
        self.extend(round);
    }
}

impl Accumulate for u64 {
    fn add(&mut self, round: Self) {
        *self += round;
    }
}

impl<A: Accumulate, B: Accumulate> Accumulate for (A, B) {
    fn add(&mut self, round: Self) {
        self.0.add(round.0);
        self.1.add(round.1);
    }
}

/// Runs one worker per state, each looping `op` until the window ends or `op` returns `None`
/// (nothing left). Counts the items of operations that complete inside the window.
pub(super) async fn run_workers<S, F, Fut>(
    states: Vec<S>,
    warmup: Duration,
    window: Duration,
    op: F,
) -> Step<Throughput>
where
    S: Clone + Send + 'static,
    F: Fn(S) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Option<u64>>> + Send + 'static,
{
    let from = Instant::now() + warmup;
    let until = from + window;
    let mut set = JoinSet::new();
    for state in states {
        set.spawn(async move {
            let (mut items, mut last, mut exhausted) = (0u64, None, false);
            while Instant::now() < until {
                let Some(n) = op(state.clone()).await? else {
                    exhausted = true;
                    break;
                };
                let now = Instant::now();
                if now >= from {
                    items += n;
                    last = Some(now);
                }
            }
            Ok::<_, Error>((items, last, exhausted))
        });
    }
    let mut total = Throughput::default();
    let mut end: Option<Instant> = None;
    while let Some(result) = set.join_next().await {
        let (items, last, exhausted) = joined(result)?;
        total.items += items;
        total.exhausted |= exhausted;
        end = end.max(last);
    }
    total.secs = end.map_or(0.0, |end| end.duration_since(from).as_secs_f64());
    Ok(total)
}

impl Bench<'_> {
    /// Measures two sides of a comparison in alternating rounds of `phase / rounds` each (the
    /// warm-up before the first round of each side), so that a change of load on the machine
    /// during the case hits both sides alike. Rounds alternate the order too (A B, B A, …).
    pub(super) async fn alternate<T, FA, A, FB, B>(&self, mut a: FA, mut b: FB) -> Step<(T, T)>
    where
        T: Accumulate,
        FA: FnMut(Duration, Duration) -> A,
        A: Future<Output = Step<T>>,
        FB: FnMut(Duration, Duration) -> B,
        B: Future<Output = Step<T>>,
    {
        let rounds = self.config.rounds.max(1);
        let slice = self.config.phase / rounds;
        let (mut sum_a, mut sum_b) = (T::default(), T::default());
        for round in 0..rounds {
            let warmup = self.warmup_of(round);
            // A B, B A, A B, …: a drift in load during the case cancels out.
            if round % 2 == 0 {
                sum_a.add(a(warmup, slice).await?);
                sum_b.add(b(warmup, slice).await?);
            } else {
                sum_b.add(b(warmup, slice).await?);
                sum_a.add(a(warmup, slice).await?);
            }
        }
        Ok((sum_a, sum_b))
    }

    /// [`Bench::alternate`] with any number of sides, told apart by their index; the order
    /// rotates every round (A B C, B C A, C A B, …).
    pub(super) async fn alternate_n<T, F, Fut>(&self, sides: usize, mut side: F) -> Step<Vec<T>>
    where
        T: Accumulate,
        F: FnMut(usize, Duration, Duration) -> Fut,
        Fut: Future<Output = Step<T>>,
    {
        let rounds = self.config.rounds.max(1);
        let slice = self.config.phase / rounds;
        let mut sums: Vec<T> = (0..sides).map(|_| T::default()).collect();
        for round in 0..rounds {
            let warmup = self.warmup_of(round);
            for k in 0..sides {
                let i = (k + round as usize) % sides;
                sums[i].add(side(i, warmup, slice).await?);
            }
        }
        Ok(sums)
    }

    fn warmup_of(&self, round: u32) -> Duration {
        if round == 0 {
            self.config.warmup
        } else {
            Duration::ZERO
        }
    }
}

/// `1000000` → `1M`, `100000` → `100k`.
pub(super) fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

pub(super) fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// `VmHWM` of this process, in MiB.
pub(super) fn vm_hwm_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0).
pub(super) fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
