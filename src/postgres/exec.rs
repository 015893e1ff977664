//! How the engine's statements reach the server: the one place that decides between prepared
//! statements and unnamed ones ([`StatementMode`]).
//!
//! Prepared mode parses each statement once per pooled connection (deadpool's statement cache)
//! and then only binds it: the fastest on a direct connection. Unnamed mode sends Parse, Bind and
//! Execute of an unnamed statement with its declared parameter types in one round trip
//! (`query_typed`), so nothing outlives the transaction: the mode for transaction-mode poolers
//! (PgBouncer before 1.21 or without `max_prepared_statements`, Supabase's and Neon's poolers),
//! which hand each transaction to whichever server connection is free.

use std::future::Future;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error as PgError, GenericClient, Row};

use crate::{Error, Result};

/// How the engine sends its SQL statements. Choose it with
/// [`PgBackendBuilder::statement_mode`](crate::PgBackendBuilder::statement_mode) or the URL
/// parameter `pgtide_statements=prepared|unnamed`. Defaults to [`StatementMode::Prepared`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatementMode {
    /// Named prepared statements, parsed once per pooled connection and cached. The fastest;
    /// needs a session per connection (a direct connection, or a pooler in session mode).
    #[default]
    Prepared,
    /// Unnamed statements with their parameter types sent along: Parse, Bind and Execute in one
    /// round trip, nothing kept on the server between transactions. Use it behind a pooler in
    /// transaction mode (PgBouncer, Supabase, Neon). The pool's connections then also send no
    /// startup `options`, which such poolers refuse.
    Unnamed,
}

impl StatementMode {
    /// The value of the URL parameter `pgtide_statements` for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementMode::Prepared => "prepared",
            StatementMode::Unnamed => "unnamed",
        }
    }
}

impl std::str::FromStr for StatementMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<StatementMode> {
        match s {
            "prepared" => Ok(StatementMode::Prepared),
            "unnamed" => Ok(StatementMode::Unnamed),
            other => Err(Error::InvalidConfig(format!(
                "statement mode {other:?}: use \"prepared\" or \"unnamed\""
            ))),
        }
    }
}

/// The URL parameter that selects the [`StatementMode`].
const STATEMENTS_PARAM: &str = "pgtide_statements";

/// Takes pgtide's own parameters out of a `postgres://` URL's query string (drivers refuse
/// parameters they do not know): returns the URL without them and the statement mode it asked
/// for. Connection strings in `key=value` form are returned as they are.
pub(crate) fn strip_url_params(url: &str) -> Result<(String, Option<StatementMode>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut mode = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((STATEMENTS_PARAM, value)) => mode = Some(value.parse()?),
            _ if pair == STATEMENTS_PARAM => {
                return Err(Error::InvalidConfig(format!(
                    "URL parameter {STATEMENTS_PARAM} needs a value: prepared or unnamed"
                )))
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, mode))
}

/// One of the engine's statements: its SQL rendered for the namespace, the types of its
/// parameters, and the mode it is sent in.
pub(crate) struct Statement {
    pub sql: String,
    pub types: &'static [Type],
    pub mode: StatementMode,
}

/// Bind parameters of one statement.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

impl Statement {
    /// Pairs the parameters with their declared types, for `query_typed`.
    fn typed<'a>(&self, params: &'a Params<'a>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
        // A count mismatch is a bug in the call site: the server rejects the Bind with a clear
        // error, and the statement type check test catches it first.
        debug_assert_eq!(params.len(), self.types.len(), "{}", self.sql);
        params
            .iter()
            .copied()
            .zip(self.types.iter().cloned())
            .collect()
    }

    /// Whether sqlx may prepare the statement as a named one on the caller's connection
    /// (`Query::persistent`). In unnamed mode it must not: a named statement lives on one server
    /// connection behind a pooler, and another client's collides with it there.
    pub(crate) fn sqlx_persistent(&self) -> bool {
        self.mode == StatementMode::Prepared
    }

    /// Runs the statement on a pooled connection (prepared statements cached per connection).
    pub(crate) async fn rows(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        params: &Params<'_>,
    ) -> std::result::Result<Vec<Row>, PgError> {
        match self.mode {
            StatementMode::Prepared => {
                let stmt = client.prepare_cached(&self.sql).await?;
                client.query(&stmt, params).await
            }
            StatementMode::Unnamed => client.query_typed(&self.sql, &self.typed(params)).await,
        }
    }

    /// [`Statement::rows`] for a statement that returns exactly one row.
    pub(crate) async fn one(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        params: &Params<'_>,
    ) -> std::result::Result<Row, PgError> {
        match self.mode {
            StatementMode::Prepared => {
                let stmt = client.prepare_cached(&self.sql).await?;
                client.query_one(&stmt, params).await
            }
            StatementMode::Unnamed => client.query_typed_one(&self.sql, &self.typed(params)).await,
        }
    }

    /// [`Statement::rows`] for a statement that returns at most one row.
    pub(crate) async fn opt(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        params: &Params<'_>,
    ) -> std::result::Result<Option<Row>, PgError> {
        match self.mode {
            StatementMode::Prepared => {
                let stmt = client.prepare_cached(&self.sql).await?;
                client.query_opt(&stmt, params).await
            }
            StatementMode::Unnamed => client.query_typed_opt(&self.sql, &self.typed(params)).await,
        }
    }

    /// Runs the statement on a pooled connection and returns the number of rows it changed.
    pub(crate) async fn execute(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        params: &Params<'_>,
    ) -> std::result::Result<u64, PgError> {
        match self.mode {
            StatementMode::Prepared => {
                let stmt = client.prepare_cached(&self.sql).await?;
                client.execute(&stmt, params).await
            }
            StatementMode::Unnamed => client.execute_typed(&self.sql, &self.typed(params)).await,
        }
    }

    /// Runs the statement on the caller's client or transaction (or one of the pool's
    /// transactions), where nothing is cached: prepared mode prepares it for this call.
    pub(crate) async fn rows_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        params: &Params<'_>,
    ) -> std::result::Result<Vec<Row>, PgError> {
        match self.mode {
            StatementMode::Prepared => client.query(self.sql.as_str(), params).await,
            StatementMode::Unnamed => client.query_typed(&self.sql, &self.typed(params)).await,
        }
    }

    /// [`Statement::rows_in`] for a statement that returns exactly one row.
    pub(crate) async fn one_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        params: &Params<'_>,
    ) -> std::result::Result<Row, PgError> {
        match self.mode {
            StatementMode::Prepared => client.query_one(self.sql.as_str(), params).await,
            StatementMode::Unnamed => client.query_typed_one(&self.sql, &self.typed(params)).await,
        }
    }
}

/// A connection the engine runs a statement on, so that code shared by the pool's paths and the
/// caller's-transaction paths (settles, the publish statements) is written once.
pub(crate) trait Exec: Sync {
    /// [`Statement::rows`] or [`Statement::rows_in`], whichever fits the connection.
    fn run<'a>(
        &'a self,
        stmt: &'a Statement,
        params: &'a Params<'a>,
    ) -> impl Future<Output = std::result::Result<Vec<Row>, PgError>> + Send + 'a;

    /// [`Statement::one`] or [`Statement::one_in`], whichever fits the connection.
    fn run_one<'a>(
        &'a self,
        stmt: &'a Statement,
        params: &'a Params<'a>,
    ) -> impl Future<Output = std::result::Result<Row, PgError>> + Send + 'a;
}

impl Exec for deadpool_postgres::ClientWrapper {
    fn run<'a>(
        &'a self,
        stmt: &'a Statement,
        params: &'a Params<'a>,
    ) -> impl Future<Output = std::result::Result<Vec<Row>, PgError>> + Send + 'a {
        stmt.rows(self, params)
    }

    fn run_one<'a>(
        &'a self,
        stmt: &'a Statement,
        params: &'a Params<'a>,
    ) -> impl Future<Output = std::result::Result<Row, PgError>> + Send + 'a {
        stmt.one(self, params)
    }
}

/// The caller's client or transaction (or one of the pool's transactions) as an [`Exec`].
pub(crate) struct Caller<'c, C>(pub &'c C);

impl<C: GenericClient + Sync> Exec for Caller<'_, C> {
    fn run<'a>(
        &'a self,
        stmt: &'a Statement,
        params: &'a Params<'a>,
    ) -> impl Future<Output = std::result::Result<Vec<Row>, PgError>> + Send + 'a {
        stmt.rows_in(self.0, params)
    }

    fn run_one<'a>(
        &'a self,
        stmt: &'a Statement,
        params: &'a Params<'a>,
    ) -> impl Future<Output = std::result::Result<Row, PgError>> + Send + 'a {
        stmt.one_in(self.0, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_stripped() {
        let cases = [
            ("postgres://h/db", "postgres://h/db", None),
            (
                "postgres://h/db?pgtide_statements=unnamed",
                "postgres://h/db",
                Some(StatementMode::Unnamed),
            ),
            (
                "postgres://h/db?sslmode=disable&pgtide_statements=prepared&application_name=x",
                "postgres://h/db?sslmode=disable&application_name=x",
                Some(StatementMode::Prepared),
            ),
            ("host=h dbname=db", "host=h dbname=db", None),
        ];
        for (url, stripped, mode) in cases {
            assert_eq!(strip_url_params(url).unwrap(), (stripped.to_owned(), mode));
        }
        for bad in [
            "postgres://h/db?pgtide_statements=named",
            "postgres://h/db?pgtide_statements",
        ] {
            assert!(matches!(
                strip_url_params(bad),
                Err(Error::InvalidConfig(_))
            ));
        }
    }
}
