//! The conformance suite, instantiated for every backend. Each backend gets a fresh, isolated
//! instance per test (its own Postgres namespace, or its own broker-side prefix).

mod cases;
pub(crate) mod fair;
pub(crate) mod flow_control;
pub(crate) mod key_limits;
pub(crate) mod ordering;

/// Generates one `#[tokio::test]` per case for a backend made by `$make` (an async fn).
macro_rules! conformance {
    ($backend:ident, $make:path) => {
        mod $backend {
            conformance!(@cases $make;
                publish_fetch_ack, fan_out_to_two_groups, competing_consumers_never_share, nack_with_delay,
                lease_expiry_redelivers, in_progress_keeps_the_lease, term_dead_letters_with_reason,
                max_deliver_dead_letters, dedupe, delayed_publish, batch_publish, stats,
                bad_names_are_typed_errors, worker_runs_the_same_handler,
                release_makes_visible_at_once_and_fences, ack_and_fetch_acks_then_claims,
                purge_and_delete, group_start_oldest, priority_overtakes,
                stale_handle_settles_are_fenced, try_fetch_zero_claims_nothing,
                expired_last_lease_dead_letters, out_of_range_durations_are_refused,
                event_envelope_round_trips, event_worker_dead_letters_malformed,
                ordered_group_delivers_each_key_in_order, max_in_flight_caps_the_group,
                pause_key_holds_one_key_while_others_drain, rate_limit_holds_the_group,
                rate_limit_per_key_holds_one_key_while_others_drain,
                fair_share_splits_by_weight, fair_share_is_work_conserving,
                fair_share_retry_is_not_starved, fair_share_gives_no_credit_for_idleness,
                max_in_flight_per_key_caps_each_key);
        }
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (queue, _guard) = $make().await;
                crate::conformance::cases::$case(queue).await;
            }
        )*
    };
}

mod backends {
    use crate::common::{namespace, TestNs};

    pub async fn postgres() -> (pgtide::PgBackend, TestNs) {
        let ns = namespace().await;
        (ns.pg.clone(), ns)
    }

    pub async fn memory() -> (pgtide::MemoryBackend, ()) {
        (pgtide::MemoryBackend::new(), ())
    }

    /// Through `AnyBackend`, so URL dispatch is exercised too.
    pub async fn any_memory() -> (pgtide::AnyBackend, ()) {
        (
            pgtide::AnyBackend::connect("memory://", "conformance")
                .await
                .unwrap(),
            (),
        )
    }

    /// Postgres through `AnyBackend` (a namespace of its own, migrated by the helper).
    pub async fn any_postgres() -> (pgtide::AnyBackend, TestNs) {
        let ns = namespace().await;
        let any = pgtide::AnyBackend::connect(&ns.url, ns.namespace())
            .await
            .unwrap();
        (any, ns)
    }
}

conformance!(postgres, crate::conformance::backends::postgres);

/// Slow cases, on Postgres and memory only (the other backends share the worker code).
mod slow {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn worker_keeps_every_lease_postgres() {
        let (queue, _guard) = crate::conformance::backends::postgres().await;
        crate::conformance::cases::worker_keeps_every_lease(queue).await;
    }

    /// Issue 12: 10 000 messages over 100 keys, 8 consumers split over two handles with their
    /// own connection pools (standing for two processes: nothing is shared but the database),
    /// random failures and retries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ordered_keys_under_load_postgres() {
        let (queue, ns) = crate::conformance::backends::postgres().await;
        let other = pgtide::PgBackend::builder(ns.url.clone())
            .namespace(ns.namespace())
            .pool_size(8)
            .build()
            .unwrap();
        crate::conformance::ordering::ordered_keys_under_load(&[queue, other], 10_000, 100, 8)
            .await;
    }

    /// Issue 12.2: max_in_flight = 5 across 3 handles with their own pools (standing for three
    /// processes), sampled from the database while they run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_in_flight_holds_across_processes_postgres() {
        let (queue, ns) = crate::conformance::backends::postgres().await;
        let handle = || {
            pgtide::PgBackend::builder(ns.url.clone())
                .namespace(ns.namespace())
                .pool_size(4)
                .build()
                .unwrap()
        };
        let raw = ns.raw().await;
        let sql = format!(
            "SELECT count(*) FROM \"{}\".deliveries WHERE state = 'in_flight'",
            ns.namespace()
        );
        let sample = || async { raw.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) };
        crate::conformance::ordering::max_in_flight_holds_under_load(
            &[queue, handle(), handle()],
            5,
            600,
            sample,
        )
        .await;
    }

    /// Issue 12: max_in_flight_per_key = 3 over 20 keys, six consumers on three handles with
    /// their own pools (standing for three processes), the most leased deliveries of one key
    /// sampled from the database (`deliveries` view) while they run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_in_flight_per_key_holds_across_processes_postgres() {
        let (queue, ns) = crate::conformance::backends::postgres().await;
        let handle = || {
            pgtide::PgBackend::builder(ns.url.clone())
                .namespace(ns.namespace())
                .pool_size(4)
                .build()
                .unwrap()
        };
        let raw = ns.raw().await;
        let sql = format!(
            "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM \"{}\".deliveries
             WHERE state = 'in_flight' GROUP BY key) x",
            ns.namespace()
        );
        let sample = || async { raw.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) };
        crate::conformance::key_limits::max_in_flight_per_key_holds_under_load(
            &[queue, handle(), handle()],
            3,
            20,
            30,
            sample,
        )
        .await;
    }

    /// Issue 12.3: a rate of 100/s held within 10 % over 10 s by six consumers on three
    /// handles with their own pools (standing for three processes), counted from the claim
    /// times the database gave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_limit_holds_100_per_second_across_processes_postgres() {
        let (queue, ns) = crate::conformance::backends::postgres().await;
        let handle = || {
            pgtide::PgBackend::builder(ns.url.clone())
                .namespace(ns.namespace())
                .pool_size(2)
                .build()
                .unwrap()
        };
        crate::conformance::flow_control::rate_limit_holds_under_load(
            &[queue, handle(), handle()],
            6,
            100.0,
            10,
            std::time::Duration::from_secs(10),
        )
        .await;
    }

    /// Issue 12.5 with the issue's sizes: tenant a with 100 000 ready, tenant b with 1 000,
    /// one consumer fetching batches of 10: b's share while it has work is 50 % ± 10 % with
    /// equal weights and 75 % ± 10 % with weights 1:3.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fair_share_with_the_issue_sizes_postgres() {
        let (queue, _ns) = crate::conformance::backends::postgres().await;
        crate::conformance::fair::fair_share_case(&queue, 100_000, 1_000, 10).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ordered_keys_under_load_memory() {
        let (queue, _guard) = crate::conformance::backends::memory().await;
        crate::conformance::ordering::ordered_keys_under_load(
            &[queue.clone(), queue],
            10_000,
            100,
            8,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn worker_keeps_every_lease_memory() {
        let (queue, _guard) = crate::conformance::backends::memory().await;
        crate::conformance::cases::worker_keeps_every_lease(queue).await;
    }
}
conformance!(memory, crate::conformance::backends::memory);
conformance!(any_memory, crate::conformance::backends::any_memory);
conformance!(any_postgres, crate::conformance::backends::any_postgres);

#[cfg(feature = "amqp")]
pub(crate) mod amqp;
#[cfg(feature = "kafka")]
pub(crate) mod kafka;
#[cfg(feature = "kafka")]
mod kafka_records;
#[cfg(feature = "nats")]
pub(crate) mod nats;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "sqs")]
mod sqs;
