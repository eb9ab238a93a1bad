-- The durable core: runs, their journal (steps), signals, and the append-only history.
--
-- Glossary (see ARCHITECTURE.md): a run is one execution of a workflow; its journal is the list of
-- steps it has recorded, in the order the workflow called them (seq); a lease gives one worker the
-- right to advance a run, and its fencing epoch makes a worker that lost the lease unable to write.
-- Timers are `runs.wake_at` (and, per sleep or signal wait, `steps.wake_at`): a run is runnable
-- when `wake_at <= now()` and no live lease holds it.

create table runs (
    id                uuid primary key,
    workflow          text        not null,
    workflow_version  integer     not null,
    input             jsonb       not null,
    status            text        not null default 'pending'
        check (status in ('pending', 'running', 'waiting', 'succeeded', 'failed', 'cancelled')),
    output            jsonb,
    error             text,
    -- Who or what started the run (api, cli, cron:<name>, webhook:<name>, parent:<id>, ...).
    started_by        text        not null default 'api',
    idempotency_key   text unique,
    concurrency_key   text,
    concurrency_limit integer,
    -- false while the run waits for a free slot under its concurrency key.
    admitted          boolean     not null default true,
    parent_run_id     uuid references runs (id),
    parent_seq        integer,
    cancel_requested  boolean     not null default false,
    cancel_reason     text,
    -- When the run is next runnable; null means only an outside event (signal, child, cancel) wakes it.
    wake_at           timestamptz,
    -- Set by an outside event that arrives while a worker holds the lease, so that the worker's
    -- release does not overwrite the wake-up it did not see.
    wakeup_pending    boolean     not null default false,
    lease_owner       text,
    lease_expires_at  timestamptz,
    lease_epoch       bigint      not null default 0,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    started_at        timestamptz,
    finished_at       timestamptz
);

-- The sweeper's scan: every run that could be advanced now.
create index runs_runnable on runs (wake_at)
    where status in ('pending', 'running', 'waiting') and admitted;
create index runs_listing on runs (created_at desc);
create index runs_by_status on runs (status, created_at desc);
create index runs_by_workflow on runs (workflow, created_at desc);
create index runs_concurrency on runs (concurrency_key, created_at)
    where concurrency_key is not null and status in ('pending', 'running', 'waiting');
create index runs_children on runs (parent_run_id) where parent_run_id is not null;

create table steps (
    run_id       uuid        not null references runs (id) on delete cascade,
    seq          integer     not null,
    name         text        not null,
    kind         text        not null check (kind in ('step', 'sleep', 'signal', 'child', 'undo')),
    status       text        not null
        check (status in ('running', 'retrying', 'waiting', 'succeeded', 'failed', 'cancelled')),
    attempts     integer     not null default 0,
    -- null when the step is sensitive: its result is then re-derived on replay, never stored.
    output       jsonb,
    sensitive    boolean     not null default false,
    error        text,
    -- Permanent errors fail the step at once; transient ones are retried by the policy.
    error_kind   text check (error_kind in ('transient', 'permanent', 'timeout', 'cancelled')),
    -- Next attempt (retrying), deadline (sleep, signal wait).
    wake_at      timestamptz,
    -- For kind 'child': the child run.
    child_run_id uuid references runs (id),
    started_at   timestamptz not null default now(),
    finished_at  timestamptz,
    updated_at   timestamptz not null default now(),
    primary key (run_id, seq)
);

create table signals (
    id          bigserial primary key,
    run_id      uuid        not null references runs (id) on delete cascade,
    name        text        not null,
    payload     jsonb       not null,
    sent_by     text        not null default 'api',
    created_at  timestamptz not null default now(),
    -- The wait (steps.seq) that received it; null while it is buffered.
    consumed_seq integer
);
create index signals_pending on signals (run_id, name, id) where consumed_seq is null;

-- Append-only history of each run: what happened, when, by whom. Never updated or deleted
-- by the engine; it is the audit trail.
create table run_events (
    id          bigserial primary key,
    run_id      uuid        not null references runs (id) on delete cascade,
    at          timestamptz not null default now(),
    kind        text        not null,
    seq         integer,
    step        text,
    attempt     integer,
    detail      jsonb       not null default '{}'::jsonb
);
create index run_events_by_run on run_events (run_id, id);
