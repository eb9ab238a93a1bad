-- Alertmanager: one row per alert episode (fingerprint + startsAt) and route, whatever the
-- number of notifications about it. A held-back episode is recorded with why, and tried again
-- on the next notification while it still fires.
create table alert_episodes (
    route        text        not null,
    fingerprint  text        not null,
    starts_at    timestamptz not null,
    -- The guardrail target (values of the route's target labels).
    target       text        not null,
    labels       jsonb       not null,
    -- started | held-back | failed
    outcome      text        not null,
    detail       text,
    run_id       uuid references runs (id),
    first_seen   timestamptz not null default now(),
    started_at   timestamptz,
    resolved_at  timestamptz,
    primary key (route, fingerprint, starts_at)
);
create index alert_episodes_target on alert_episodes (route, target, started_at desc);
create index alert_episodes_started on alert_episodes (route, started_at desc);

-- Every notification received, for the record and to tell repeats apart from silence.
create table alert_notifications (
    id           bigserial primary key,
    receiver     text,
    status       text        not null,
    group_key    text,
    alerts       integer     not null,
    summary      jsonb       not null,
    received_at  timestamptz not null default now()
);
