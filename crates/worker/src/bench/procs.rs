//! What the bench reads from `/proc`: the CPU time and peak RSS of the processes it measures
//! (its own, `serve`, the workers, PostgreSQL's, the whole machine's), with the parsers kept
//! apart from the reads so that they can be tested.
//!
//! CPU time is `utime + stime` of `/proc/<pid>/stat`, in clock ticks (`getconf CLK_TCK`,
//! 100 on Linux). PostgreSQL forks a process per connection, so its CPU is summed over the
//! postmaster's children at both ends of a window, plus the postmaster's `cutime + cstime`
//! (what children that exited in between used, once reaped), see [`PgCpu`].

use std::collections::HashMap;

/// The fields of `/proc/<pid>/stat` the bench uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stat {
    pub(super) ppid: u32,
    /// `utime + stime`: CPU used by the process itself (all its threads), in ticks.
    pub(super) ticks: u64,
    /// `cutime + cstime`: CPU used by children it has waited for, in ticks.
    pub(super) child_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces or parentheses, so the fields are counted from the last `)`.
pub(super) fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // Field 3 (state) is at index 0 of what follows the name.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        ticks: field(14)? + field(15)?,
        child_ticks: field(16)? + field(17)?,
    })
}

/// Parses the peak resident set size (`VmHWM`, in KiB) out of `/proc/<pid>/status`.
pub(super) fn parse_vm_hwm_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Parses the first line of `/proc/stat`: (busy, all) ticks of every CPU together. Busy is all
/// but `idle` and `iowait`; `guest` is already inside `user`, so it is not added again.
pub(super) fn parse_machine(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// `/proc/<pid>/stat` of one process, if it is still there.
pub(super) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The peak RSS of `pid` in MiB, if it is still there.
pub(super) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let kib = parse_vm_hwm_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)?;
    Some(kib as f64 / 1024.0)
}

/// The machine's (busy, all) CPU ticks.
pub(super) fn machine() -> Option<(u64, u64)> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The command name of `pid` (`/proc/<pid>/comm`).
pub(super) fn comm(pid: u32) -> Option<String> {
    Some(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_string(),
    )
}

/// Every process whose parent is `ppid`, with its stat.
pub(super) fn children_of(ppid: u32) -> HashMap<u32, Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, s)| s.ppid == ppid)
        .collect()
}

/// Clock ticks per second of the times in `/proc` (`getconf CLK_TCK`; Linux's is 100).
pub(super) fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Which of PostgreSQL's processes a child of the postmaster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PgRole {
    /// A backend (or autovacuum worker) of the bench's database.
    Ours,
    /// A backend of another database (other clients of the same server).
    Other,
    /// A process of the server as a whole: WAL writer, checkpointer, background writer,
    /// launchers (none of them has a database).
    Server,
}

/// PostgreSQL's processes at one instant: the postmaster and its children, each with its role.
#[derive(Debug, Clone, Default)]
pub(super) struct PgSnapshot {
    pub(super) postmaster: Option<Stat>,
    pub(super) children: HashMap<u32, (PgRole, Stat)>,
}

/// CPU ticks PostgreSQL used between two snapshots, by role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PgCpu {
    /// Backends of the bench's database alive at the end.
    pub(super) ours: u64,
    /// Backends of other databases alive at the end: not the bench's load.
    pub(super) other: u64,
    /// The postmaster and the processes without a database.
    pub(super) server: u64,
    /// Children that exited between the snapshots (any database: autovacuum workers, short
    /// connections of other clients), from the postmaster's `cutime + cstime`.
    pub(super) exited: u64,
}

impl PgCpu {
    /// Per process: its ticks at the end less those at the start (all of them if it started in
    /// between); a process gone at the end is in the postmaster's child ticks, whole, so what
    /// it had used before the start is taken out of those.
    pub(super) fn between(a: &PgSnapshot, b: &PgSnapshot) -> Self {
        let mut cpu = Self::default();
        for (pid, (role, end)) in &b.children {
            let start = a.children.get(pid).map_or(0, |(_, s)| s.ticks);
            let used = end.ticks.saturating_sub(start);
            match role {
                PgRole::Ours => cpu.ours += used,
                PgRole::Other => cpu.other += used,
                PgRole::Server => cpu.server += used,
            }
        }
        if let (Some(pa), Some(pb)) = (a.postmaster, b.postmaster) {
            cpu.server += pb.ticks.saturating_sub(pa.ticks);
            let gone: u64 = a
                .children
                .iter()
                .filter(|(pid, _)| !b.children.contains_key(pid))
                .map(|(_, (_, s))| s.ticks)
                .sum();
            cpu.exited = pb.child_ticks.saturating_sub(pa.child_ticks).saturating_sub(gone);
        }
        cpu
    }
}

/// Reads PostgreSQL's processes, given the postmaster's pid and which database each backend
/// serves (`pg_stat_activity`: pid → database, none for the server's own processes).
pub(super) fn pg_snapshot(postmaster: u32, databases: &HashMap<u32, Option<String>>, ours: &str) -> PgSnapshot {
    let children = children_of(postmaster)
        .into_iter()
        .map(|(pid, s)| {
            let role = match databases.get(&pid) {
                Some(Some(db)) if db == ours => PgRole::Ours,
                Some(Some(_)) => PgRole::Other,
                // Not in pg_stat_activity (the logger, or a backend younger than the query):
                // counted with the server.
                _ => PgRole::Server,
            };
            (pid, (role, s))
        })
        .collect();
    PgSnapshot {
        postmaster: stat(postmaster),
        children,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_from_after_the_command_name() {
        // A name with a space and a parenthesis, as a thread name can have.
        let line = "4242 (postgres: a) b) S 17 4242 4242 0 -1 4194560 1200 0 0 0 \
                    731 52 9 4 20 0 1 0 1234 371736000 6389 18446744073709551615 0 0 0 0 0 0 0 \
                    4194304 117 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 17,
                ticks: 731 + 52,
                child_ticks: 9 + 4,
            })
        );
        assert_eq!(parse_stat("4242 (truncated) S 17"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn the_peak_rss_is_read_from_the_status_file() {
        let status = "Name:\tdayshift\nVmPeak:\t  812000 kB\nVmHWM:\t   88120 kB\nVmRSS:\t   80000 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(88120));
        assert_eq!(parse_vm_hwm_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn the_machine_line_counts_idle_and_iowait_as_not_busy() {
        let text = "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 3 0\n";
        assert_eq!(parse_machine(text), Some((100 + 5 + 50 + 3 + 2 + 1, 161 + 1000 + 20)));
        assert_eq!(parse_machine("cpu0 1 2 3\n"), None);
    }

    fn s(ticks: u64, child_ticks: u64) -> Stat {
        Stat {
            ppid: 1,
            ticks,
            child_ticks,
        }
    }

    #[test]
    fn postgres_cpu_counts_what_each_process_used_in_the_window_and_what_exited() {
        let a = PgSnapshot {
            postmaster: Some(s(10, 500)),
            children: HashMap::from([
                (1, (PgRole::Ours, s(100, 0))),
                (2, (PgRole::Server, s(40, 0))),
                // Exits in the window, after 30 ticks more.
                (3, (PgRole::Other, s(200, 0))),
            ]),
        };
        let b = PgSnapshot {
            postmaster: Some(s(12, 500 + 230 + 15)),
            children: HashMap::from([
                (1, (PgRole::Ours, s(160, 0))),
                (2, (PgRole::Server, s(45, 0))),
                // Born in the window.
                (4, (PgRole::Ours, s(8, 0))),
            ]),
        };
        // The child that was born and exited in the window (15 ticks) and the one that exited
        // (30 of its 230 in the window) are both "exited".
        assert_eq!(
            PgCpu::between(&a, &b),
            PgCpu {
                ours: 60 + 8,
                other: 0,
                server: 5 + 2,
                exited: 30 + 15,
            }
        );
    }

    #[test]
    fn postgres_cpu_without_a_postmaster_counts_only_live_processes() {
        let a = PgSnapshot::default();
        let b = PgSnapshot {
            postmaster: None,
            children: HashMap::from([(7, (PgRole::Other, s(9, 0)))]),
        };
        assert_eq!(
            PgCpu::between(&a, &b),
            PgCpu {
                other: 9,
                ..PgCpu::default()
            }
        );
    }
}
