//! The engine's SQL statements: the files in `sql/`, loaded at compile time and rendered once
//! per namespace, and the one helper that runs them on a pooled connection.
//!
//! `@ns@` in a file becomes the quoted namespace and `@ns_lit@` the namespace as a string
//! literal. Namespace names are validated before anything is rendered, so no user input is ever
//! spliced into SQL: stream, group and consumer names are always bind parameters.

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::PgBackend;
use crate::error::Ctx;
use crate::{Error, Result};

/// Replaces the namespace placeholders of a SQL text. The namespace is validated beforehand.
pub(crate) fn render(sql: &str, namespace: &str) -> String {
    sql.replace("@ns_lit@", &format!("'{namespace}'"))
        .replace("@ns@", &format!("\"{namespace}\""))
}

/// Declares [`Statements`] from `field => "file in sql/"` pairs, so a statement is named once.
macro_rules! statements {
    ($($field:ident => $file:literal,)*) => {
        /// The engine's statements, rendered for one namespace (one field per file in `sql/`).
        pub(crate) struct Statements {
            $(#[doc = concat!("`sql/", $file, "`")] pub $field: String,)*
        }

        impl Statements {
            pub(crate) fn render(ns: &str) -> Statements {
                Statements {
                    $($field: render(include_str!(concat!("../../sql/", $file)), ns),)*
                }
            }
        }
    };
}

statements! {
    // hot paths: prepared, and checked for O(batch) plans by tests/it/postgres/plans.rs
    publish => "publish.sql",
    publish_one => "publish_one.sql",
    claim => "claim.sql",
    ack_claim => "ack_claim.sql",
    ack => "ack.sql",
    nack => "nack.sql",
    term => "term.sql",
    extend => "extend.sql",
    release => "release.sql",
    stats => "stats.sql",
    group_stats => "group_stats.sql",
    scout_due => "scout_due.sql",
    // registry
    stream_create => "stream_create.sql",
    stream_update => "stream_update.sql",
    stream_read => "stream_read.sql",
    stream_delete => "stream_delete.sql",
    stream_purge => "stream_purge.sql",
    stream_trim => "stream_trim.sql",
    group_create => "group_create.sql",
    group_delete => "group_delete.sql",
    group_list => "group_list.sql",
    group_id => "group_id.sql",
    group_reset => "group_reset.sql",
    // operations and inspection
    consumer_release => "consumer_release.sql",
    grant_runtime => "grant_runtime.sql",
    revoke_runtime => "revoke_runtime.sql",
    publish_counts => "publish_counts.sql",
    maintain => "maintain.sql",
    dead_letters => "dead_letters.sql",
    dead_replay => "dead_replay.sql",
    dead_purge => "dead_purge.sql",
    // scout
    scout_holder => "scout_holder.sql",
    scout_acquire => "scout_acquire.sql",
    scout_resign => "scout_resign.sql",
    scout_maintain => "scout_maintain.sql",
    // migrate
    migrate_schema => "migrate_schema.sql",
    migrate_lock => "migrate_lock.sql",
    migrate_installed => "migrate_installed.sql",
    migrate_pending => "migrate_pending.sql",
    migrate_record => "migrate_record.sql",
    migrate_status => "migrate_status.sql",
    migrate_regrant => "migrate_regrant.sql",
}

/// Bind parameters of one statement.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

impl PgBackend {
    /// Runs one of the namespace's statements on a pooled connection and returns its rows;
    /// database errors raised by pgtide's SQL become typed errors about `ctx`.
    pub(crate) async fn sql_rows(
        &self,
        sql: &str,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<Vec<Row>> {
        let client = self.client().await?;
        client
            .query(sql, params)
            .await
            .map_err(|e| Error::from_pg(e, ctx))
    }

    /// [`PgBackend::sql_rows`] for a statement that returns exactly one row.
    pub(crate) async fn sql_row(
        &self,
        sql: &str,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<Row> {
        let client = self.client().await?;
        client
            .query_one(sql, params)
            .await
            .map_err(|e| Error::from_pg(e, ctx))
    }

    /// [`PgBackend::sql_rows`] for a statement that returns at most one row.
    pub(crate) async fn sql_row_opt(
        &self,
        sql: &str,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<Option<Row>> {
        let client = self.client().await?;
        client
            .query_opt(sql, params)
            .await
            .map_err(|e| Error::from_pg(e, ctx))
    }

    /// The single value of a one-row, one-column statement.
    pub(crate) async fn sql_value<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        ctx: Ctx<'_>,
    ) -> Result<T>
    where
        T: for<'r> tokio_postgres::types::FromSql<'r>,
    {
        Ok(self.sql_row(sql, params, ctx).await?.try_get(0)?)
    }
}
