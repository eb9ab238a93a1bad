-- Trust boundaries: a webhook body is bound to the event type it was first received as (a
-- signed body replayed under another X-GitHub-Event is refused), found by its digest.
alter table webhook_deliveries add column body_sha256 text;
create index webhook_deliveries_by_body on webhook_deliveries (forge, body_sha256) where body_sha256 is not null;
-- Tag events count the deletions of their tag, so that a tag made again is a new event.
create index webhook_deliveries_by_identity on webhook_deliveries (identity) where identity is not null;
