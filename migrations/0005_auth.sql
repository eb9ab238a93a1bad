-- API tokens: only a SHA-256 hash of each token is stored (tokens are 256 random bits, so a
-- fast hash is enough; the clear token is shown once, at creation). A revoked token stays,
-- for the audit trail.
create table api_tokens (
    id           uuid        primary key,
    name         text        not null,
    role         text        not null check (role in ('viewer', 'operator', 'admin')),
    token_hash   bytea       not null unique,
    created_at   timestamptz not null default now(),
    created_by   text        not null,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
create unique index api_tokens_live_name on api_tokens (name) where revoked_at is null;

-- Who did what to which run, schedule or token, through the API or the CLI.
create table audit_log (
    id      bigserial   primary key,
    at      timestamptz not null default now(),
    actor   text        not null,
    role    text,
    action  text        not null,
    target  text,
    detail  jsonb       not null default '{}'::jsonb
);
create index audit_log_by_time on audit_log (at desc);
create index audit_log_by_target on audit_log (target, at desc);
