-- The W3C trace context of the run's trace (see crates/engine/src/telemetry.rs); null when
-- tracing is off.
alter table runs add column trace_context text;
