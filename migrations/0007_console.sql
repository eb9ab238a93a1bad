-- The console's look-ups: what started a run (its schedule tick, webhook delivery or alert
-- episode), and which runs wait for an approval.
create index schedule_ticks_by_run on schedule_ticks (run_id) where run_id is not null;
create index webhook_deliveries_by_run on webhook_deliveries using gin (run_ids);
create index alert_episodes_by_run on alert_episodes (run_id) where run_id is not null;
create index steps_waiting_for_signal on steps (name, started_at)
    where kind = 'signal' and status = 'waiting';
