-- Cron schedules. The schedules themselves are declared in the config file; PostgreSQL keeps
-- what must survive restarts and be shared by every `serve` replica: whether a schedule is
-- paused, the last tick it has dealt with, and what happened to each tick.
--
-- Exactly one run per tick is enforced by the run's idempotency key
-- (`schedule:<name>:<tick>`, unique in `runs`), not by this table.

create table schedules (
    name        text primary key,
    paused      boolean     not null default false,
    -- The newest tick dealt with (started, skipped or held back); ticks after it are due.
    last_tick   timestamptz not null,
    updated_at  timestamptz not null default now(),
    updated_by  text        not null default 'scheduler'
);

create table schedule_ticks (
    schedule    text        not null,
    tick        timestamptz not null,
    -- started | duplicate | missed (catch-up policy) | skipped (overlap policy) | failed
    outcome     text        not null,
    run_id      uuid references runs (id),
    detail      text,
    at          timestamptz not null default now(),
    primary key (schedule, tick)
);
create index schedule_ticks_recent on schedule_ticks (schedule, tick desc);
