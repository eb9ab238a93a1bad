-- Every webhook delivery dayshift accepted (a valid signature), and what became of it: the
-- record a platform team looks at when a push "did nothing". Duplicates are recognised by the
-- event's identity (see crates/engine/src/webhook.rs), not by this table.
create table webhook_deliveries (
    id           bigserial primary key,
    forge        text        not null,
    delivery_id  text,
    event        text        not null,
    repository   text,
    identity     text,
    -- started | duplicate | no-route | ignored | ping
    outcome      text        not null,
    detail       text,
    run_ids      uuid[]      not null default '{}',
    received_at  timestamptz not null default now()
);
create index webhook_deliveries_recent on webhook_deliveries (received_at desc);
