//! Installing and upgrading a namespace.
//!
//! Two kinds of SQL, kept apart:
//! - versioned migrations (`migrations/`): tables, indexes and data changes. Each runs once, by
//!   sqlx's migrator, bookkept in `<ns>._sqlx_migrations`. Released ones are never edited.
//! - function files (`sql/functions/`): every function and view, written with CREATE OR REPLACE.
//!   After the migrations, `migrate()` re-applies each file whose text changed since it was last
//!   applied (all of them in one transaction), bookkept by checksum in `<ns>._pgtide_sql`. A fix
//!   to a function is a diff to its file.
//!
//! Everything runs on one connection of its own (never a pooled one) whose `search_path` is the
//! namespace alone, so sqlx's bookkeeping table lands in the namespace, never in the host
//! application's schema. That connection holds the namespace's migration lock (a session advisory
//! lock), so concurrent `migrate()` calls from several processes queue; if the future is dropped,
//! the connection is dropped with it and the server releases the lock.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::migrate::{Migrate, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{Connection, Executor, PgConnection};

use super::{render, PgBackend};
use crate::{Error, Result};

#[rustfmt::skip]
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "core", include_str!("../../migrations/0001_core.sql")),
    (2, "delivery", include_str!("../../migrations/0002_delivery.sql")),
    (3, "wakeups", include_str!("../../migrations/0003_wakeups.sql")),
    (4, "purge", include_str!("../../migrations/0004_purge.sql")),
    (5, "operations", include_str!("../../migrations/0005_operations.sql")),
    (6, "plans", include_str!("../../migrations/0006_plans.sql")),
    (7, "sql_files", include_str!("../../migrations/0007_sql_files.sql")),
    (8, "lease_tokens", include_str!("../../migrations/0008_lease_tokens.sql")),
    (9, "least_privilege", include_str!("../../migrations/0009_least_privilege.sql")),
    (10, "ordering", include_str!("../../migrations/0010_ordering.sql")),
    (11, "flow_control", include_str!("../../migrations/0011_flow_control.sql")),
    (12, "fair_share", include_str!("../../migrations/0012_fair_share.sql")),
    (13, "key_concurrency", include_str!("../../migrations/0013_key_concurrency.sql")),
    (14, "key_index", include_str!("../../migrations/0014_key_index.sql")),
    (15, "key_heads", include_str!("../../migrations/0015_key_heads.sql")),
    (16, "wake_waiters", include_str!("../../migrations/0016_wake_waiters.sql")),
];

/// The function and view files, in the order they are applied: a file may use what an earlier
/// one defines (SQL-language function bodies are checked when created).
#[rustfmt::skip]
const FUNCTION_FILES: &[(&str, &str)] = &[
    ("functions/core.sql", include_str!("../../sql/functions/core.sql")),
    ("functions/ordering.sql", include_str!("../../sql/functions/ordering.sql")),
    ("functions/flow_control.sql", include_str!("../../sql/functions/flow_control.sql")),
    ("functions/fair.sql", include_str!("../../sql/functions/fair.sql")),
    ("functions/maintenance.sql", include_str!("../../sql/functions/maintenance.sql")),
    ("functions/registry.sql", include_str!("../../sql/functions/registry.sql")),
    ("functions/publish.sql", include_str!("../../sql/functions/publish.sql")),
    ("functions/delivery.sql", include_str!("../../sql/functions/delivery.sql")),
    ("functions/wakeups.sql", include_str!("../../sql/functions/wakeups.sql")),
    ("functions/operations.sql", include_str!("../../sql/functions/operations.sql")),
    ("functions/inspection.sql", include_str!("../../sql/functions/inspection.sql")),
];

/// Dollar-quote tag for migration texts inside the bookkeeping inserts.
const TAG: &str = "$pgtide_migration$";

/// What one [`PgBackend::migrate`] call applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrateReport {
    /// Versioned migrations applied by this call, oldest first, as `"0007_sql_files"`.
    pub migrations: Vec<String>,
    /// Function and view files (re-)applied by this call, in apply order, as
    /// `"functions/delivery.sql"` (paths under `sql/`). A file whose text is unchanged since it
    /// was last applied is skipped.
    pub sql_files: Vec<String>,
}

impl MigrateReport {
    /// True when the namespace was already current: nothing was applied.
    pub fn is_empty(&self) -> bool {
        self.migrations.is_empty() && self.sql_files.is_empty()
    }
}

fn migration_name(version: i64, name: &str) -> String {
    format!("{version:04}_{name}")
}

/// The function files rendered for `namespace`, in apply order.
fn function_files(namespace: &str) -> Vec<(&'static str, String)> {
    FUNCTION_FILES
        .iter()
        .map(|(file, sql)| (*file, render(sql, namespace)))
        .collect()
}

/// The SQL script that installs the namespace from scratch, for a DBA to review and apply by
/// hand (`psql -v ON_ERROR_STOP=1 -f FILE`). It runs in one transaction: the migrations, the
/// function files, and the bookkeeping of both (migration checksums as sqlx computes them, file
/// checksums as `migrate()` computes them), so `migrate()` and `is_migrated()` see a namespace
/// installed this way as current.
pub fn migration_sql(namespace: &str) -> Result<String> {
    crate::names::validate_namespace(namespace)?;
    let mut out = format!(
        "-- pgtide: install namespace \"{namespace}\". Apply with: psql -v ON_ERROR_STOP=1 -f FILE\n\
         -- The objects belong to the user applying it.\nBEGIN;\nCREATE SCHEMA IF NOT EXISTS \"{namespace}\";\n"
    );
    let rendered: Vec<(i64, &str, String)> = MIGRATIONS
        .iter()
        .map(|(v, name, sql)| (*v, *name, render(sql, namespace)))
        .collect();
    for (version, name, sql) in &rendered {
        out.push_str(&format!("\n-- migration {version}: {name}\n{sql}"));
    }
    let files = function_files(namespace);
    for (file, sql) in &files {
        out.push_str(&format!("\n-- sql/{file}\n{sql}"));
    }
    out.push_str(&format!(
        "\n-- bookkeeping: the migrations above, as sqlx records them\n\
         CREATE TABLE \"{namespace}\"._sqlx_migrations (\n    version BIGINT PRIMARY KEY,\n    \
         description TEXT NOT NULL,\n    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),\n    \
         success BOOLEAN NOT NULL,\n    checksum BYTEA NOT NULL,\n    execution_time BIGINT NOT NULL\n);\n"
    ));
    for (version, name, sql) in &rendered {
        debug_assert!(!sql.contains(TAG));
        out.push_str(&format!(
            "INSERT INTO \"{namespace}\"._sqlx_migrations (version, description, success, checksum, execution_time)\n\
             VALUES ({version}, '{name}', true, sha384(convert_to({TAG}{sql}{TAG}, 'UTF8')), 0);\n"
        ));
    }
    out.push_str("\n-- bookkeeping: the function files above, as migrate() records them\n");
    for (file, sql) in &files {
        debug_assert!(!sql.contains(TAG));
        out.push_str(&format!(
            "INSERT INTO \"{namespace}\"._pgtide_sql (file, checksum)\n\
             VALUES ('{file}', sha256(convert_to({TAG}{sql}{TAG}, 'UTF8')));\n"
        ));
    }
    out.push_str(&format!(
        "\n-- privileges: no function executable by PUBLIC; roles granted before keep their grants\n\
         SELECT \"{namespace}\"._regrant();\n"
    ));
    out.push_str("COMMIT;\n");
    Ok(out)
}

#[derive(Debug)]
struct Source(String);

impl MigrationSource<'static> for Source {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, name, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*name),
                        MigrationType::Simple,
                        Cow::Owned(render(sql, &self.0)),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// A function file that failed to apply.
#[derive(Debug, thiserror::Error)]
#[error("sql/{file}: {source}")]
struct FileFailed {
    file: &'static str,
    #[source]
    source: sqlx::Error,
}

fn migrate_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Migrate(Box::new(e))
}

impl PgBackend {
    /// Installs or upgrades the namespace: applies the versioned migrations it lacks, then
    /// re-applies the function and view files whose text changed. Returns what it applied
    /// (empty when the namespace was current). Idempotent and safe to call from many processes
    /// at once (they queue on an advisory lock). Needs the right to create a schema and tables,
    /// and to own the namespace's functions: run it as the namespace owner, never as a runtime
    /// role (those hold no table privileges). Roles granted with [`PgBackend::grant_runtime`] or
    /// [`PgBackend::grant_read_only`] are re-granted what this release's functions need. It connects to
    /// [`PgBackend::listen_url`]: behind a pooler in transaction mode, give the builder the
    /// direct URL with [`PgBackendBuilder::listen_url`](crate::PgBackendBuilder::listen_url)
    /// (the lock needs a session; PgBouncer also refuses the `search_path` startup option).
    ///
    /// Cancel safety: it works on a connection of its own, which holds the lock and is dropped
    /// with the future (the server then releases the lock). Each migration runs in its own
    /// transaction and the function files in one: dropping the future leaves the namespace at
    /// the last completed step, and the next call continues from there.
    pub async fn migrate(&self) -> Result<MigrateReport> {
        // A session of its own (the advisory lock is session level): the direct URL when the
        // pool goes through a pooler.
        let options = self.session_connect().sqlx_options()?.options([
            ("search_path", format!("\"{}\"", self.namespace())),
            // A database-wide timeout would cancel a long migration or the wait for another
            // process's migration lock (see SESSION_SETTINGS).
            ("statement_timeout", "0".to_owned()),
            ("idle_in_transaction_session_timeout", "0".to_owned()),
            // Migrations repair key lines, whose functions need READ COMMITTED.
            (
                "default_transaction_isolation",
                crate::postgres::connect::option_value("read committed"),
            ),
        ]);
        let mut conn = PgConnection::connect_with(&options).await.map_err(|e| {
            match crate::postgres::connect_problem(&e) {
                Some(problem) => Error::Connect {
                    problem,
                    source: Box::new(e),
                },
                None => migrate_err(e),
            }
        })?;
        let result = self.migrate_on(&mut conn).await;
        // Ending the session releases the lock.
        let _ = conn.close().await;
        result
    }

    async fn migrate_on(&self, conn: &mut PgConnection) -> Result<MigrateReport> {
        let ns = self.namespace();
        let sql = &self.inner.sql;
        sqlx::query(&sql.migrate_lock.sql)
            .execute(&mut *conn)
            .await
            .map_err(migrate_err)?;
        // Executor::execute, not RawSql::execute: the latter's future is not Send for every
        // lifetime (a higher-ranked lifetime limitation), which would make migrate() !Send.
        (&mut *conn)
            .execute(sqlx::raw_sql(&sql.migrate_schema.sql))
            .await
            .map_err(migrate_err)?;

        conn.ensure_migrations_table().await.map_err(migrate_err)?;
        let before: Vec<i64> = conn
            .list_applied_migrations()
            .await
            .map_err(migrate_err)?
            .iter()
            .map(|m| m.version)
            .collect();
        let mut migrator = Migrator::new(Source(ns.to_owned()))
            .await
            .map_err(migrate_err)?;
        // Our own lock is held already.
        migrator.set_locking(false);
        // run_direct: `run` makes this future !Send (a higher-ranked lifetime limitation).
        migrator.run_direct(&mut *conn).await.map_err(migrate_err)?;
        let mut report = MigrateReport {
            migrations: MIGRATIONS
                .iter()
                .filter(|(v, _, _)| !before.contains(v))
                .map(|(v, name, _)| migration_name(*v, name))
                .collect(),
            sql_files: vec![],
        };

        let files = function_files(ns);
        let names: Vec<String> = files.iter().map(|(f, _)| (*f).to_owned()).collect();
        let bodies: Vec<String> = files.iter().map(|(_, s)| s.clone()).collect();
        let pending: Vec<String> = sqlx::query_scalar(&sql.migrate_pending.sql)
            .bind(&names)
            .bind(&bodies)
            .fetch_all(&mut *conn)
            .await
            .map_err(migrate_err)?;
        if pending.is_empty() {
            if !report.migrations.is_empty() {
                (&mut *conn)
                    .execute(sqlx::raw_sql(&sql.migrate_regrant.sql))
                    .await
                    .map_err(migrate_err)?;
            }
            return Ok(report);
        }
        let mut tx = conn.begin().await.map_err(migrate_err)?;
        for (file, body) in &files {
            if !pending.iter().any(|p| p == file) {
                continue;
            }
            (&mut *tx)
                .execute(sqlx::raw_sql(body))
                .await
                .map_err(|source| migrate_err(FileFailed { file, source }))?;
            sqlx::query(&sql.migrate_record.sql)
                .bind(*file)
                .bind(body.as_str())
                .execute(&mut *tx)
                .await
                .map_err(migrate_err)?;
            report.sql_files.push((*file).to_owned());
        }
        // Re-created functions start executable by PUBLIC and by nobody granted: put the
        // recorded roles' privileges back, in the same transaction.
        (&mut *tx)
            .execute(sqlx::raw_sql(&sql.migrate_regrant.sql))
            .await
            .map_err(migrate_err)?;
        tx.commit().await.map_err(migrate_err)?;
        Ok(report)
    }

    /// True when the namespace is installed with every migration this library knows and every
    /// function file applied as this library has it (false for a namespace that a newer
    /// `migrate()` would change).
    pub async fn is_migrated(&self) -> Result<bool> {
        let client = self.client().await?;
        let sql = &self.inner.sql;
        let installed: bool = sql.migrate_installed.one(&client, &[]).await?.try_get(0)?;
        if !installed {
            return Ok(false);
        }
        let files = function_files(self.namespace());
        let names: Vec<&str> = files.iter().map(|(f, _)| *f).collect();
        let bodies: Vec<&str> = files.iter().map(|(_, s)| s.as_str()).collect();
        let current: bool = sql
            .migrate_status
            .one(&client, &[&(MIGRATIONS.len() as i64), &names, &bodies])
            .await?
            .try_get(0)?;
        Ok(current)
    }
}

impl PgBackend {
    /// The newest migration installed in the namespace, or `None` when the namespace is not
    /// installed. Compare with [`PgBackend::latest_migration`] to tell a fresh install from an
    /// upgrade (the `pgtide migrate` command reports what it applied this way).
    pub async fn migration_version(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let table = format!("\"{}\"._sqlx_migrations", self.namespace());
        let sql = &self.inner.sql;
        let exists: Option<String> = sql
            .migrate_table
            .one(&client, &[&table])
            .await?
            .try_get(0)?;
        if exists.is_none() {
            return Ok(None);
        }
        Ok(sql.migration_version.one(&client, &[]).await?.try_get(0)?)
    }

    /// The number of the newest migration this library knows (migrations run from 1 to it).
    pub fn latest_migration() -> i64 {
        MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
    }
}
