//! What the bench counts around a workload: PostgreSQL's commits and tuple writes (database-wide
//! and per table), Redis's commands, and the CPU time of every process involved.
//!
//! Counters are read from `pg_stat_database`, `pg_stat_user_tables` and Redis `INFO`; CPU from
//! `/proc` ([`super::procs`]) and, for Redis, from `INFO cpu` (its own `getrusage`), so Redis
//! may be elsewhere. PostgreSQL's CPU is read only when the server runs on this machine: the
//! backend of one of the bench's connections must be a local `postgres` process, whose parent
//! is the postmaster.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Result;
use sqlx::PgPool;

use super::procs::{self, PgCpu, PgSnapshot};

/// Counter names (the per-table ones are `<table>.ins`, `<table>.upd`, `<table>.del`).
pub(super) const COMMITS: &str = "commits";
pub(super) const INSERTED: &str = "inserted";
pub(super) const UPDATED: &str = "updated";
pub(super) const HOT_UPDATED: &str = "hot-updated";
pub(super) const DELETED: &str = "deleted";
pub(super) const REDIS_COMMANDS: &str = "redis-commands";

/// Monotonic counters at one instant, by name.
#[derive(Debug, Clone, Default)]
pub(super) struct Counters(pub(super) BTreeMap<String, i64>);

impl Counters {
    /// How much each counter grew since `earlier`, less `idle` (per second) over `secs`.
    pub(super) fn since(&self, earlier: &Self, idle: &BTreeMap<String, f64>, secs: f64) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(k, v)| {
                let grew = (v - earlier.0.get(k).copied().unwrap_or(0)) as f64;
                (k.clone(), grew - idle.get(k).copied().unwrap_or(0.0) * secs)
            })
            .collect()
    }
}

/// The CPU clocks of everything measured, at one instant.
#[derive(Debug, Clone)]
pub(super) struct CpuSample {
    at: Instant,
    /// The dayshift processes the bench started, by label, in clock ticks.
    named: Vec<(String, u64)>,
    /// The bench process itself.
    client: u64,
    pg: PgSnapshot,
    /// Redis's own user + system seconds.
    redis: f64,
    machine: Option<(u64, u64)>,
}

/// CPU seconds used between two samples.
#[derive(Debug, Clone)]
pub(super) struct CpuUse {
    pub(super) secs: f64,
    pub(super) named: Vec<(String, f64)>,
    pub(super) client: f64,
    /// `None` when PostgreSQL is not on this machine.
    pub(super) pg: Option<PgSeconds>,
    pub(super) redis: f64,
    /// The machine's busy CPU seconds (all cores) and the seconds its cores had in all.
    pub(super) machine: Option<(f64, f64)>,
}

/// [`PgCpu`] in seconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct PgSeconds {
    pub(super) ours: f64,
    pub(super) server: f64,
    pub(super) bench: f64,
    pub(super) other: f64,
    pub(super) exited: f64,
}

impl PgSeconds {
    /// What counts as the workload's: the database's backends (less the bench's polling one)
    /// and the server's own processes.
    pub(super) fn workload(&self) -> f64 {
        self.ours + self.server
    }
}

impl CpuUse {
    /// Every process of dayshift the bench started (serve, workers).
    pub(super) fn dayshift(&self) -> f64 {
        self.named.iter().map(|(_, s)| s).sum()
    }

    /// Everything the workload used: dayshift's processes, the client, PostgreSQL, Redis.
    pub(super) fn everything(&self) -> f64 {
        self.dayshift() + self.client + self.pg.map_or(0.0, |p| p.workload() + p.bench) + self.redis
    }
}

/// Reads the counters and clocks.
pub(super) struct Probe {
    pool: PgPool,
    redis: redis::aio::MultiplexedConnection,
    database: String,
    postmaster: Option<u32>,
    /// The backend of the bench's polling connection, counted apart.
    poller: Option<u32>,
    tick: f64,
}

impl Probe {
    /// A probe over `pool`'s database and the Redis at `redis_url`; `poller` is the backend pid
    /// of the connection the bench polls with.
    pub(super) async fn new(pool: &PgPool, redis_url: &str, poller: Option<u32>) -> Result<Self> {
        let (database, backend): (String, i32) =
            sqlx::query_as("/* bench */ select current_database(), pg_backend_pid()")
                .fetch_one(pool)
                .await?;
        let postmaster = u32::try_from(backend)
            .ok()
            .filter(|pid| procs::comm(*pid).as_deref() == Some("postgres"))
            .and_then(procs::stat)
            .map(|s| s.ppid)
            .filter(|pid| procs::comm(*pid).as_deref() == Some("postgres"));
        let redis = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self {
            pool: pool.clone(),
            redis,
            database,
            postmaster,
            poller,
            tick: procs::ticks_per_second(),
        })
    }

    /// Whether PostgreSQL's processes can be read (the server is on this machine).
    pub(super) fn pg_is_local(&self) -> bool {
        self.postmaster.is_some()
    }

    async fn redis_info(&self) -> Result<String> {
        let mut conn = self.redis.clone();
        Ok(redis::cmd("INFO")
            .arg("stats")
            .arg("cpu")
            .query_async(&mut conn)
            .await?)
    }

    /// Commits, tuple writes (database-wide and per table) and Redis commands.
    pub(super) async fn counters(&self) -> Result<Counters> {
        let (commits, ins, upd, del): (i64, i64, i64, i64) = sqlx::query_as(
            "/* bench */ select xact_commit, tup_inserted, tup_updated, tup_deleted from pg_stat_database \
             where datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        let tables: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "/* bench */ select relname::text, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd from pg_stat_user_tables",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut c = BTreeMap::from([
            (COMMITS.to_string(), commits),
            (INSERTED.to_string(), ins),
            (UPDATED.to_string(), upd),
            (DELETED.to_string(), del),
        ]);
        let mut hot = 0;
        for (t, i, u, d, h) in tables {
            c.insert(format!("{t}.ins"), i);
            c.insert(format!("{t}.upd"), u);
            c.insert(format!("{t}.del"), d);
            hot += h;
        }
        c.insert(HOT_UPDATED.to_string(), hot);
        let info = self.redis_info().await?;
        c.insert(
            REDIS_COMMANDS.to_string(),
            info_field(&info, "total_commands_processed").unwrap_or(0.0) as i64,
        );
        Ok(Counters(c))
    }

    /// The clocks of `named` processes (label, pid), of this process, PostgreSQL's, Redis's
    /// and the machine's.
    pub(super) async fn cpu(&self, named: &[(String, u32)]) -> Result<CpuSample> {
        let pg = match self.postmaster {
            Some(postmaster) => {
                let rows: Vec<(i32, Option<String>)> =
                    sqlx::query_as("/* bench */ select pid, datname::text from pg_stat_activity")
                        .fetch_all(&self.pool)
                        .await?;
                let databases: HashMap<u32, Option<String>> = rows
                    .into_iter()
                    .filter_map(|(pid, db)| Some((u32::try_from(pid).ok()?, db)))
                    .collect();
                procs::pg_snapshot(postmaster, &databases, &self.database)
            }
            None => PgSnapshot::default(),
        };
        let info = self.redis_info().await?;
        let redis =
            info_field(&info, "used_cpu_sys").unwrap_or(0.0) + info_field(&info, "used_cpu_user").unwrap_or(0.0);
        Ok(CpuSample {
            at: Instant::now(),
            named: named
                .iter()
                .map(|(l, pid)| (l.clone(), procs::stat(*pid).map_or(0, |s| s.ticks)))
                .collect(),
            client: procs::stat(std::process::id()).map_or(0, |s| s.ticks),
            pg,
            redis,
            machine: procs::machine(),
        })
    }

    /// CPU seconds used from `a` to `b`.
    pub(super) fn used(&self, a: &CpuSample, b: &CpuSample) -> CpuUse {
        let s = |ticks: u64| ticks as f64 / self.tick;
        let named = b
            .named
            .iter()
            .map(|(l, end)| {
                let start = a.named.iter().find(|(k, _)| k == l).map_or(0, |(_, t)| *t);
                (l.clone(), s(end.saturating_sub(start)))
            })
            .collect();
        let pg = self.postmaster.map(|_| {
            let PgCpu {
                ours,
                other,
                server,
                exited,
            } = PgCpu::between(&a.pg, &b.pg);
            // The polling backend is one of ours: counted apart.
            let bench = self
                .poller
                .and_then(|pid| {
                    let end = b.pg.children.get(&pid)?.1.ticks;
                    Some(end.saturating_sub(a.pg.children.get(&pid).map_or(0, |(_, st)| st.ticks)))
                })
                .unwrap_or(0);
            PgSeconds {
                ours: s(ours.saturating_sub(bench)),
                server: s(server),
                bench: s(bench),
                other: s(other),
                exited: s(exited),
            }
        });
        CpuUse {
            secs: b.at.duration_since(a.at).as_secs_f64(),
            named,
            client: s(b.client.saturating_sub(a.client)),
            pg,
            redis: b.redis - a.redis,
            machine: match (a.machine, b.machine) {
                (Some((ba, aa)), Some((bb, ab))) => Some((s(bb.saturating_sub(ba)), s(ab.saturating_sub(aa)))),
                _ => None,
            },
        }
    }
}

/// A numeric field of Redis's `INFO` answer (`name:value` lines).
pub(super) fn info_field(info: &str, name: &str) -> Option<f64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_info_fields_are_read_by_their_whole_name() {
        let info = "# Stats\r\ntotal_connections_received:12\r\ntotal_commands_processed:48213\r\n\
                    # CPU\r\nused_cpu_sys:1.250000\r\nused_cpu_user:3.500000\r\nused_cpu_sys_children:0.000000\r\n";
        assert_eq!(info_field(info, "total_commands_processed"), Some(48213.0));
        assert_eq!(info_field(info, "used_cpu_sys"), Some(1.25));
        assert_eq!(info_field(info, "used_cpu_user"), Some(3.5));
        assert_eq!(info_field(info, "used_cpu"), None);
    }

    #[test]
    fn counters_grow_less_the_idle_rate() {
        let a = Counters(BTreeMap::from([("commits".into(), 100), ("runs.ins".into(), 5)]));
        let b = Counters(BTreeMap::from([
            ("commits".into(), 190),
            ("runs.ins".into(), 25),
            ("steps.ins".into(), 60),
        ]));
        let idle = BTreeMap::from([("commits".to_string(), 3.0)]);
        let d = b.since(&a, &idle, 10.0);
        assert_eq!(d["commits"], 90.0 - 30.0);
        assert_eq!(d["runs.ins"], 20.0);
        // A table that appeared in between counts from zero.
        assert_eq!(d["steps.ins"], 60.0);
    }
}
