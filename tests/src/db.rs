//! A PostgreSQL database of a test's own ([`TestDb`]), created on the shared server, and ways
//! to look at what was stored in it.

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use dayshift_engine::PgStore;

use crate::{database_url, unique};

/// A database of its own, migrated.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// Creates `dayshift_test_<unique>` and applies the migrations.
    pub async fn new() -> Self {
        let db = Self::create(30).await;
        PgStore::new(db.pool.clone()).migrate().await.expect("migrate");
        db
    }

    /// A database of its own with nothing in it (a backup's source or restore target).
    pub async fn empty() -> Self {
        Self::create(5).await
    }

    async fn create(max_connections: u32) -> Self {
        let server = database_url();
        let name = format!("dayshift_test_{}", unique());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&server)
            .await
            .expect("cannot connect to PostgreSQL; is `scripts/services.sh up` running?");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = replace_db(&server, &name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&url)
            .await
            .expect("connect to test database");
        Self { url, pool }
    }

    /// A checksum of every row of every table in `public`, by table.
    pub async fn table_checksums(&self) -> Vec<(String, String)> {
        let tables: Vec<String> = sqlx::query_scalar(
            "select table_name::text from information_schema.tables where table_schema = 'public' order by 1",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut out = Vec::new();
        for t in tables {
            let sum: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select md5(string_agg(x.r, ',' order by x.r)) from (select t::text as r from \"{t}\" t) x"
            )))
            .fetch_one(&self.pool)
            .await
            .unwrap();
            out.push((t, sum.unwrap_or_default()));
        }
        out
    }

    /// Every row of every dayshift table, as text: for checking what was stored.
    pub async fn dump(&self) -> String {
        let tables: Vec<String> =
            sqlx::query_scalar("select table_name::text from information_schema.tables where table_schema = 'public'")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut out = String::new();
        for t in tables {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select row_to_json(t)::text from \"{t}\" t"
            )))
            .fetch_all(&self.pool)
            .await
            .unwrap();
            for r in rows {
                out.push_str(&t);
                out.push(' ');
                out.push_str(&r);
                out.push('\n');
            }
        }
        out
    }

    /// Counts rows of a side-effect table per (run, step).
    pub async fn side_effects(&self, table: &str) -> Vec<(String, String, i64)> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select run_id, step, count(*) from {table} group by run_id, step order by run_id, step"
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
    }
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}
