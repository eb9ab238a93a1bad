//! The triggers: front doors that start runs on their own (a cron tick, a git delivery, an
//! Alertmanager notification). Each intake is whole in its module, from the request it gets
//! to the runs it starts and what it records; exactly-once is always an idempotency key in
//! PostgreSQL, never timing. They are built by the binary from the config and handed to the
//! API and the scheduler loop; the engine holds none of them.

pub mod alerts;
pub mod intake;
pub mod schedule;
pub mod webhook;
