//! Installing and upgrading a namespace.
//!
//! Migrations are plain SQL files rendered for the namespace and run by sqlx's migrator on one
//! connection whose `search_path` is the namespace alone, so sqlx's bookkeeping table lands in
//! the namespace (`<ns>._sqlx_migrations`), never in the host application's. A per-namespace
//! advisory lock makes concurrent `migrate()` calls from several processes safe.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

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
];

/// Dollar-quote tag for migration texts inside the bookkeeping inserts.
const TAG: &str = "$pgtide_migration$";

/// The SQL script that installs the namespace from scratch, for a DBA to review and apply by
/// hand (`psql -v ON_ERROR_STOP=1 -f FILE`). It runs in one transaction and also records the
/// migrations in the namespace's bookkeeping table (checksums as sqlx computes them), so
/// `migrate()` and `is_migrated()` see a namespace installed this way as current.
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

fn migrate_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Migrate(Box::new(e))
}

impl PgBackend {
    /// Installs or upgrades the namespace. Idempotent and safe to call from many processes at
    /// once (they queue on an advisory lock). Needs the right to create a schema and tables.
    ///
    /// Cancel safety: each migration runs in its own transaction; dropping this future leaves the
    /// namespace at the last completed migration and the next call continues from there.
    pub async fn migrate(&self) -> Result<()> {
        let ns = self.namespace();
        // The lock is held on a pooled connection of our own; the migrations run on a separate
        // sqlx connection whose search_path is the namespace alone.
        let client = self.client().await?;
        let key = format!("pgtide.migrate.{ns}");
        client
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&key])
            .await?;
        let result = async {
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{ns}\""))
                .await?;
            let options = PgConnectOptions::from_str(self.url())
                .map_err(migrate_err)?
                .options([("search_path", format!("\"{ns}\""))]);
            let mut conn = PgConnection::connect_with(&options)
                .await
                .map_err(migrate_err)?;
            let mut migrator = Migrator::new(Source(ns.to_owned()))
                .await
                .map_err(migrate_err)?;
            migrator.set_locking(false);
            // run_direct: `run` makes this future !Send (a higher-ranked lifetime limitation).
            let result = migrator.run_direct(&mut conn).await.map_err(migrate_err);
            let _ = conn.close().await;
            result
        }
        .await;
        // Always unlock; if this fails the pooled connection is poisoned and its close frees it.
        if client
            .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
            .await
            .is_err()
        {
            let _ = deadpool_postgres::Object::take(client);
        }
        result
    }

    /// True when the namespace is installed with every migration this library knows.
    pub async fn is_migrated(&self) -> Result<bool> {
        let client = self.client().await?;
        let table = format!("\"{}\"._sqlx_migrations", self.namespace());
        let exists: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await?
            .get(0);
        if exists.is_none() {
            return Ok(false);
        }
        let applied: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE success AND version <= $1"),
                &[&(MIGRATIONS.len() as i64)],
            )
            .await?
            .get(0);
        Ok(applied == MIGRATIONS.len() as i64)
    }
}

impl PgBackend {
    /// The newest migration installed in the namespace, or `None` when the namespace is not
    /// installed. Compare with [`PgBackend::latest_migration`] to tell a fresh install from an
    /// upgrade (the `pgtide migrate` command reports what it applied this way).
    pub async fn migration_version(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let table = format!("\"{}\"._sqlx_migrations", self.namespace());
        let exists: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await?
            .try_get(0)?;
        if exists.is_none() {
            return Ok(None);
        }
        let sql = render(
            include_str!("../../sql/migration_version.sql"),
            self.namespace(),
        );
        Ok(client.query_one(&sql, &[]).await?.try_get(0)?)
    }

    /// The number of the newest migration this library knows (migrations run from 1 to it).
    pub fn latest_migration() -> i64 {
        MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
    }
}
