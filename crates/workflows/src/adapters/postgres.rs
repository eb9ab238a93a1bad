//! What the workflows do to a PostgreSQL server they administer (not dayshift's own database):
//! set a role's password by SCRAM verifier and check that it logs in (`rotate.postgres-password`),
//! run `pg_dump` and `pg_restore` matching the server's version (`backup.postgres`,
//! `restore.postgres`), count tables, create and drop a scratch database, and run read-only
//! checks (`backup.restore-test`, smoke checks of components).
//!
//! Every operation opens its own connection and closes it: a step may run on any worker, and a
//! connection held across steps would outlive the attempt that opened it.

use std::path::PathBuf;
use std::process::Stdio;

use sqlx::Connection;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::secrets::scram_verifier;

use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// A PostgreSQL server reached through one connection URL (with its credentials). `Debug` never
/// shows the URL.
#[derive(Clone)]
pub(crate) struct PgAdmin {
    url: String,
}

impl std::fmt::Debug for PgAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgAdmin(<redacted>)")
    }
}

/// Why a PostgreSQL operation failed. Messages never hold a password or a verifier.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    /// An administrative statement failed: `what` was being done; the server's message
    /// without the statement. Transient only when the server could not be reached.
    #[error("{what}: {message}")]
    Admin { what: String, message: String },
    /// The rotated role's new password was refused.
    #[error("the new password of {role} does not log in: {message}")]
    LoginRefused { role: String, message: String },
    /// The admin connection URL does not parse.
    #[error("the admin connection URL: {0}")]
    AdminUrl(String),
    /// The server's URL cannot take another database name.
    #[error("the server's URL: {0}")]
    ServerUrl(String),
    /// A statement on the server failed; retried when the connection failed, not when the
    /// server refused.
    #[error("{0}")]
    Sql(sqlx::Error),
    /// The server could not be read at all; another attempt may reach it.
    #[error("{0}")]
    Unreachable(sqlx::Error),
    /// A read-only query failed; `why` is its SQLSTATE, not the server's message, which can
    /// quote the data it choked on.
    #[error("{0}")]
    Query(String),
    /// A client tool (`pg_dump`, `pg_restore`) could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn { tool: String, source: std::io::Error },
    /// A client tool ran and failed; permanent when its message says another attempt cannot
    /// fix it.
    #[error("{tool} failed: {stderr}")]
    ToolFailed {
        tool: String,
        stderr: String,
        permanent: bool,
    },
}

impl PgError {
    /// Whether another attempt may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Admin { message, .. } => message.contains("connection refused") || message.contains("timed out"),
            Self::Sql(e) => matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)),
            Self::Unreachable(_) => true,
            Self::ToolFailed { permanent, .. } => !permanent,
            Self::LoginRefused { .. }
            | Self::AdminUrl(_)
            | Self::ServerUrl(_)
            | Self::Query(_)
            | Self::Spawn { .. } => false,
        }
    }

    /// The error of `tool` from its stderr: permanent for what another attempt cannot fix.
    pub(crate) fn tool_failed(tool: &str, stderr: &str) -> Self {
        let permanent = [
            "authentication failed",
            "does not exist",
            "permission denied",
            "no pg_hba.conf entry",
        ]
        .iter()
        .any(|p| stderr.contains(p));
        Self::ToolFailed {
            tool: tool.to_string(),
            stderr: stderr.trim().to_string(),
            permanent,
        }
    }
}

/// The client tools matching a server's major version, and that version.
pub(crate) struct ClientTools {
    bin: PathBuf,
    /// `show server_version`, empty when the server could not be asked.
    pub(crate) server_version: String,
}

/// A running client tool and a task collecting the first 64 KiB of its stderr.
pub(crate) type RunningTool = (Child, tokio::task::JoinHandle<String>);

impl PgAdmin {
    /// The server `url` points to, connecting as its user.
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }

    /// The same server with `database` as the database.
    pub(crate) fn on_database(&self, database: &str) -> Result<Self, PgError> {
        let mut parsed = url::Url::parse(&self.url).map_err(|e| PgError::ServerUrl(e.to_string()))?;
        parsed.set_path(&format!("/{database}"));
        Ok(Self::new(parsed))
    }

    /// `ALTER ROLE … PASSWORD '<SCRAM verifier>'`: the plaintext never reaches the server.
    /// Idempotent: setting the same password again changes nothing a login sees.
    pub(crate) async fn set_role_password(&self, role: &str, password: &str) -> Result<(), PgError> {
        let admin = |what: String| {
            move |e| PgError::Admin {
                what,
                message: redact(e),
            }
        };
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .map_err(admin("connect as admin".into()))?;
        let sql = format!(
            "alter role {} password '{}'",
            quote_ident(role),
            scram_verifier(password)
        );
        let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
        let _ = conn.close().await;
        done.map(|_| ())
            .map_err(admin(format!("set the password of role {role}")))
    }

    /// Logs in as `role` with `password` where this connection points, and runs a query.
    pub(crate) async fn check_login(&self, role: &str, password: &str) -> Result<(), PgError> {
        let options: sqlx::postgres::PgConnectOptions = self
            .url
            .parse()
            .map_err(|e: sqlx::Error| PgError::AdminUrl(e.to_string()))?;
        let mut conn = sqlx::PgConnection::connect_with(&options.username(role).password(password))
            .await
            .map_err(|e| PgError::LoginRefused {
                role: role.to_string(),
                message: redact(e),
            })?;
        let one: Result<i32, _> = sqlx::query_scalar("select 1").fetch_one(&mut conn).await;
        let _ = conn.close().await;
        one.map(|_| ()).map_err(|e| PgError::Admin {
            what: "query as the rotated role".into(),
            message: redact(e),
        })
    }

    /// The number of tables outside the system schemas.
    pub(crate) async fn count_tables(&self) -> Result<i64, PgError> {
        let pool = sqlx::PgPool::connect(&self.url).await.map_err(PgError::Unreachable)?;
        let tables = sqlx::query_scalar(
            "select count(*) from information_schema.tables where table_schema not in ('pg_catalog', 'information_schema')",
        )
        .fetch_one(&pool)
        .await
        .map_err(PgError::Unreachable);
        pool.close().await;
        tables
    }

    /// Creates database `name` empty, first dropping one left by an attempt before (a retry
    /// after a crash starts clean).
    pub(crate) async fn recreate_database(&self, name: &str) -> Result<(), PgError> {
        self.drop_database(name).await?;
        self.execute(&format!("create database \"{name}\"")).await
    }

    /// Drops database `name` if it exists, disconnecting whoever is on it. Idempotent.
    pub(crate) async fn drop_database(&self, name: &str) -> Result<(), PgError> {
        self.execute(&format!("drop database if exists \"{name}\" with (force)"))
            .await
    }

    /// Runs one statement (CREATE/DROP DATABASE, which cannot run in a transaction).
    async fn execute(&self, sql: &str) -> Result<(), PgError> {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.map_err(PgError::Sql)?;
        let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .map_err(PgError::Sql);
        let _ = conn.close().await;
        done.map(|_| ())
    }

    /// The number `query` returns, in a read-only session (`None` for NULL). A query that fails
    /// is [`PgError::Query`] with its SQLSTATE only.
    pub(crate) async fn read_only_number(&self, query: &str) -> Result<Option<f64>, PgError> {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.map_err(PgError::Sql)?;
        sqlx::query("set session characteristics as transaction read only")
            .execute(&mut conn)
            .await
            .map_err(PgError::Sql)?;
        let value: Result<Option<f64>, _> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select (({query}))::double precision")))
                .fetch_one(&mut conn)
                .await;
        let _ = conn.close().await;
        value.map_err(|e| {
            PgError::Query(match &e {
                sqlx::Error::Database(db) => format!(
                    "SQLSTATE {} (the server's message is not shown: it may quote data)",
                    db.code().as_deref().unwrap_or("unknown")
                ),
                other => other.to_string(),
            })
        })
    }

    /// The rows of `query` (a SELECT, VALUES or WITH … SELECT) with `params` bound as `$1`…, as
    /// JSON objects, at most `limit`, in a read-only transaction with a 30 s statement timeout.
    /// The query is run as a subquery, so it is one statement. A query that fails is
    /// [`PgError::Query`] with its SQLSTATE only.
    pub(crate) async fn read_only_rows(
        &self,
        query: &str,
        params: &[serde_json::Value],
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, PgError> {
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .map_err(PgError::Unreachable)?;
        for setup in [
            "set session characteristics as transaction read only",
            "set statement_timeout = '30s'",
        ] {
            sqlx::query(setup).execute(&mut conn).await.map_err(PgError::Sql)?;
        }
        let wrapped = format!(
            "select coalesce(json_agg(row_to_json(q)), '[]'::json)::jsonb from (select * from ({query}) r limit {limit}) q"
        );
        let mut q = sqlx::query_scalar::<_, serde_json::Value>(sqlx::AssertSqlSafe(wrapped));
        for p in params {
            q = match p {
                serde_json::Value::String(s) => q.bind(s.clone()),
                serde_json::Value::Bool(b) => q.bind(*b),
                serde_json::Value::Number(n) if n.is_i64() => q.bind(n.as_i64()),
                serde_json::Value::Number(n) => q.bind(n.as_f64()),
                serde_json::Value::Null => q.bind(None::<String>),
                other => q.bind(other.clone()),
            };
        }
        let rows = q.fetch_one(&mut conn).await;
        let _ = conn.close().await;
        match rows {
            Ok(serde_json::Value::Array(rows)) => Ok(rows),
            Ok(other) => Ok(vec![other]),
            Err(e) => Err(PgError::Query(match &e {
                sqlx::Error::Database(db) => format!(
                    "SQLSTATE {} (the server's message is not shown: it may quote data)",
                    db.code().as_deref().unwrap_or("unknown")
                ),
                other => other.to_string(),
            })),
        }
    }

    /// The directory of the client tools matching the server's major version, where installed
    /// (else the `PATH`'s), and the server's version.
    pub(crate) async fn client_tools(&self) -> ClientTools {
        let version = match sqlx::PgPool::connect(&self.url).await {
            Ok(pool) => {
                let v: Result<String, _> = sqlx::query_scalar("show server_version").fetch_one(&pool).await;
                pool.close().await;
                v.unwrap_or_default()
            }
            Err(_) => String::new(),
        };
        let major = version.split(['.', ' ']).next().unwrap_or_default().to_string();
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        let bin = if !major.is_empty() && dir.join("pg_dump").exists() {
            dir
        } else {
            PathBuf::new()
        };
        ClientTools {
            bin,
            server_version: version,
        }
    }

    /// Starts `tool` (pg_dump, pg_restore) of `tools` against this server with `args`, its
    /// stdin/stdout as given, the password in the environment (never in a process listing);
    /// its stderr is read concurrently, so the tool never blocks on a full pipe.
    pub(crate) fn spawn_tool(
        &self,
        tools: &ClientTools,
        tool: &str,
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<RunningTool, PgError> {
        let target = pg_target(&self.url);
        let mut cmd = Command::new(tools.bin.join(tool));
        cmd.args(args)
            .args(["--no-password", "--dbname", &target.conninfo])
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = &target.password {
            cmd.env("PGPASSWORD", p);
        }
        let mut child = cmd.spawn().map_err(|source| PgError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
        let mut stderr = child.stderr.take().expect("piped stderr");
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_string(&mut text).await;
            text
        });
        Ok((child, errors))
    }
}

/// A PostgreSQL URL split into what libpq takes on the command line and the password, which
/// goes through the environment so that it never shows in a process listing.
struct PgTarget {
    conninfo: String,
    password: Option<String>,
}

fn pg_target(url: &str) -> PgTarget {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
        && let Some((user, password)) = auth.split_once(':')
    {
        return PgTarget {
            conninfo: format!("{scheme}://{user}@{host}"),
            password: Some(password.to_string()),
        };
    }
    PgTarget {
        conninfo: url.to_string(),
        password: None,
    }
}

/// A database error's message without the statement (which holds a verifier).
fn redact(e: sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_string(),
        other => other.to_string(),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

// `connections.postgres.<name>` as the config file gives it.
/// A PostgreSQL database.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PostgresConnectionConfig {
    /// Where the connection URL (`postgres://user:password@host/db`) is.
    pub url: SecretSource,
}

impl PostgresConnectionConfig {
    /// The connection URL, read and checked; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<String, InvalidConfig> {
        let key = format!("{key}.url");
        let url = read.text(&self.url, &key)?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(InvalidConfig::new(key, "must start with postgres:// or postgresql://"));
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_goes_to_the_environment_not_the_command_line() {
        let t = pg_target("postgres://app:s3cret@db:5432/app");
        assert_eq!(t.conninfo, "postgres://app@db:5432/app");
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        assert!(pg_target("postgres://db/app").password.is_none());
    }

    #[test]
    fn a_tool_error_another_attempt_cannot_fix_is_permanent() {
        let e = PgError::tool_failed("pg_dump", "FATAL: database \"x\" does not exist\n");
        assert!(!e.is_transient());
        assert_eq!(e.to_string(), "pg_dump failed: FATAL: database \"x\" does not exist");
        assert!(PgError::tool_failed("pg_restore", "connection reset").is_transient());
    }

    #[test]
    fn another_database_keeps_the_server_and_credentials() {
        let admin = PgAdmin::new("postgres://u:p@db:5432/postgres");
        assert_eq!(
            admin.on_database("scratch").unwrap().url,
            "postgres://u:p@db:5432/scratch"
        );
        assert!(!format!("{admin:?}").contains("u:p"));
    }
}
