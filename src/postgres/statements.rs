//! The engine's SQL statements: the files in `sql/`, loaded at compile time and rendered once
//! per namespace with their parameter types, and the helpers that run them on a pooled connection
//! (through `exec.rs`, which decides how they are sent).
//!
//! `@ns@` in a file becomes the quoted namespace and `@ns_lit@` the namespace as a string
//! literal. Namespace names are validated before anything is rendered, so no user input is ever
//! spliced into SQL: stream, group and consumer names are always bind parameters.

use tokio_postgres::types::Type;
use tokio_postgres::Row;

pub(crate) use super::exec::{Params, Statement, StatementMode};
use super::PgBackend;
use crate::error::Ctx;
use crate::{Error, Result};

/// Replaces the namespace placeholders of a SQL text. The namespace is validated beforehand.
pub(crate) fn render(sql: &str, namespace: &str) -> String {
    sql.replace("@ns_lit@", &format!("'{namespace}'"))
        .replace("@ns@", &format!("\"{namespace}\""))
}

/// Declares [`Statements`] from `field => "file in sql/" [parameter types]` entries, so a
/// statement and its parameter types are named once. The types are what the server infers for
/// `$1, $2, …` (checked against a prepared statement by `PgBackend::check_statement_types`): the
/// unnamed-statement mode sends them with each statement instead of preparing it first.
macro_rules! statements {
    ($($field:ident => $file:literal [$($ty:ident),*],)*) => {
        /// The engine's statements, rendered for one namespace (one field per file in `sql/`).
        pub(crate) struct Statements {
            $(#[doc = concat!("`sql/", $file, "`")] pub $field: Statement,)*
        }

        impl Statements {
            pub(crate) fn render(ns: &str, mode: StatementMode) -> Statements {
                Statements {
                    $($field: Statement {
                        sql: render(include_str!(concat!("../../sql/", $file)), ns),
                        types: &[$(Type::$ty),*],
                        mode,
                    },)*
                }
            }

            /// How these statements are sent (the same for all of them).
            pub(crate) fn mode(&self) -> StatementMode {
                self.publish.mode
            }

            /// Every statement with its file name, for the parameter type check.
            pub(crate) fn all(&self) -> Vec<(&'static str, &Statement)> {
                vec![$(($file, &self.$field),)*]
            }
        }
    };
}

statements! {
    // hot paths: prepared, and checked for O(batch) plans by tests/it/postgres/plans.rs
    publish => "publish.sql" [TEXT, UUID_ARRAY, BYTEA_ARRAY, BOOL_ARRAY, JSONB_ARRAY, TIMESTAMPTZ_ARRAY, INT8_ARRAY, INT4_ARRAY],
    publish_wake => "publish_wake.sql" [TEXT, UUID_ARRAY, BYTEA_ARRAY, BOOL_ARRAY, JSONB_ARRAY, TIMESTAMPTZ_ARRAY, INT8_ARRAY, INT4_ARRAY, TEXT],
    publish_keyed => "publish_keyed.sql" [TEXT, UUID_ARRAY, BYTEA_ARRAY, BOOL_ARRAY, JSONB_ARRAY, TIMESTAMPTZ_ARRAY, INT8_ARRAY, INT4_ARRAY, TEXT_ARRAY],
    publish_one => "publish_one.sql" [TEXT, UUID, BYTEA, BOOL, JSONB, TIMESTAMPTZ, INT8, TEXT, INT4, TEXT],
    claim => "claim.sql" [INT4, INT4, TEXT, INT8, TIMESTAMPTZ, BOOL],
    ack_claim => "ack_claim.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT4, TEXT, INT8, INT8_ARRAY, TIMESTAMPTZ, BOOL],
    ack => "ack.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT8_ARRAY],
    nack => "nack.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT8_ARRAY, INT8_ARRAY, TEXT_ARRAY],
    term => "term.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT8_ARRAY, TEXT_ARRAY],
    extend => "extend.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT8_ARRAY, INT8],
    release => "release.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT8_ARRAY],
    pause => "pause.sql" [INT4, UUID_ARRAY, INT4_ARRAY, INT8_ARRAY, TIMESTAMPTZ],
    stats => "stats.sql" [],
    group_stats => "group_stats.sql" [TEXT, TEXT],
    scout_due => "scout_due.sql" [TIMESTAMPTZ],
    // registry
    stream_create => "stream_create.sql" [TEXT, INT8, INT4, INT8_ARRAY, INT8, INT8, INT4, INT8, FLOAT4, BOOL],
    stream_partitions => "stream_partitions.sql" [TEXT],
    stream_update => "stream_update.sql" [TEXT, INT8, INT4, INT8_ARRAY, INT8, INT8, INT4, INT8, FLOAT4],
    stream_read => "stream_read.sql" [TEXT],
    stream_delete => "stream_delete.sql" [TEXT],
    stream_purge => "stream_purge.sql" [TEXT],
    stream_trim => "stream_trim.sql" [TEXT, INT8, INT8],
    group_create => "group_create.sql" [TEXT, TEXT, TEXT, BOOL, BOOL, INT4, FLOAT8, INT4, FLOAT8, INT4, BOOL, INT4],
    group_limit => "group_limit.sql" [TEXT, TEXT, INT4],
    group_limit_per_key => "group_limit_per_key.sql" [TEXT, TEXT, INT4],
    group_rate => "group_rate.sql" [TEXT, TEXT, FLOAT8, INT4, BOOL],
    keys => "keys.sql" [TEXT, TEXT, INT8],
    group_weight => "group_weight.sql" [TEXT, TEXT, TEXT, FLOAT8],
    key_weights => "key_weights.sql" [TEXT, TEXT, INT8],
    group_delete => "group_delete.sql" [TEXT, TEXT],
    group_list => "group_list.sql" [TEXT],
    group_id => "group_id.sql" [TEXT, TEXT],
    group_reset => "group_reset.sql" [TEXT, TEXT, TIMESTAMPTZ],
    // operations and inspection
    consumer_release => "consumer_release.sql" [TEXT, TEXT, TEXT],
    grant_runtime => "grant_runtime.sql" [TEXT, BOOL],
    revoke_runtime => "revoke_runtime.sql" [TEXT],
    publish_counts => "publish_counts.sql" [],
    maintain => "maintain.sql" [TIMESTAMPTZ, INT4],
    dead_letters => "dead_letters.sql" [TEXT, TEXT, UUID, INT8],
    dead_replay => "dead_replay.sql" [TEXT, TEXT, UUID_ARRAY],
    dead_purge => "dead_purge.sql" [TEXT, TEXT, UUID_ARRAY],
    // scout
    scout_holder => "scout_holder.sql" [],
    scout_lease => "scout_lease.sql" [],
    scout_acquire => "scout_acquire.sql" [TEXT, INT8, INT8],
    scout_resign => "scout_resign.sql" [TEXT, INT8],
    scout_maintain => "scout_maintain.sql" [TEXT, INT8, INT4, INT8],
    vacuum_tables => "vacuum_tables.sql" [],
    // migrate
    migrate_schema => "migrate_schema.sql" [],
    migrate_lock => "migrate_lock.sql" [],
    migrate_installed => "migrate_installed.sql" [],
    migrate_pending => "migrate_pending.sql" [TEXT_ARRAY, TEXT_ARRAY],
    migrate_record => "migrate_record.sql" [TEXT, TEXT],
    migrate_status => "migrate_status.sql" [INT8, TEXT_ARRAY, TEXT_ARRAY],
    migration_version => "migration_version.sql" [],
    migrate_regrant => "migrate_regrant.sql" [],
    migrate_table => "migrate_table.sql" [TEXT],
    // background
    notify => "notify.sql" [TEXT, TEXT_ARRAY],
    wake_register => "wake_register.sql" [TEXT, TEXT, INT4, INT8],
    wake_release => "wake_release.sql" [TEXT_ARRAY, TEXT],
}

impl PgBackend {
    /// Runs one of the namespace's statements on a pooled connection and returns its rows;
    /// database errors raised by pgtide's SQL become typed errors about `ctx`.
    pub(crate) async fn sql_rows(
        &self,
        stmt: &Statement,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<Vec<Row>> {
        let client = self.client().await?;
        stmt.rows(&client, params)
            .await
            .map_err(|e| Error::from_pg(e, ctx))
    }

    /// [`PgBackend::sql_rows`] for a statement that returns exactly one row.
    pub(crate) async fn sql_row(
        &self,
        stmt: &Statement,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<Row> {
        let client = self.client().await?;
        stmt.one(&client, params)
            .await
            .map_err(|e| Error::from_pg(e, ctx))
    }

    /// [`PgBackend::sql_rows`] for a statement that returns at most one row.
    pub(crate) async fn sql_row_opt(
        &self,
        stmt: &Statement,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<Option<Row>> {
        let client = self.client().await?;
        stmt.opt(&client, params)
            .await
            .map_err(|e| Error::from_pg(e, ctx))
    }

    /// The single value of a one-row, one-column statement.
    pub(crate) async fn sql_value<T>(
        &self,
        stmt: &Statement,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<T>
    where
        T: for<'r> tokio_postgres::types::FromSql<'r>,
    {
        Ok(self.sql_row(stmt, params, ctx).await?.try_get(0)?)
    }

    /// Prepares every engine statement (except the migration DDL) and compares the parameter
    /// types the server infers with the declared ones; returns one line per mismatch. Needs a
    /// migrated namespace and a direct connection. For tests; not a stable interface.
    #[doc(hidden)]
    pub async fn check_statement_types(&self) -> Result<Vec<String>> {
        let client = self.client().await?;
        let mut mismatches = Vec::new();
        for (file, stmt) in self.inner.sql.all() {
            if file == "migrate_schema.sql" {
                continue;
            }
            let prepared = client.prepare(&stmt.sql).await?;
            if prepared.params() != stmt.types {
                mismatches.push(format!(
                    "sql/{file}: declared {:?}, server infers {:?}",
                    stmt.types,
                    prepared.params()
                ));
            }
        }
        Ok(mismatches)
    }
}
