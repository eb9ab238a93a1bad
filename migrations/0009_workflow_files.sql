-- Workflow files (docs/workflows.md), kept by content: a name's first text is version 1, each
-- different text the next. A run records the version it started on (runs.workflow_version) and
-- is replayed with that version's text, whatever the file says by then.
create table workflow_definitions (
    name text not null,
    version int not null,
    hash text not null,
    source text not null,
    path text not null,
    loaded_at timestamptz not null default now(),
    primary key (name, version),
    unique (name, hash)
);
