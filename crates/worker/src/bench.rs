//! `dayshift bench`: throughput and latency against the configured PostgreSQL and Redis.

use anyhow::Result;
use clap::Args;

use crate::config::Config;

/// Benchmark settings.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// W1: runs submitted at once.
    #[arg(long, default_value_t = 2000)]
    pub runs: usize,
}

/// Runs the benchmark.
pub(crate) async fn run(_config: &Config, _args: BenchArgs) -> Result<()> {
    anyhow::bail!("bench is not built yet")
}
