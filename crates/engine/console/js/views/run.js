// One run: why it failed or what it waits for, its steps as a timeline (status, attempts,
// durations, errors, undos), what started it, its input (secrets redacted by the API) and
// its history. Operators can cancel, retry, signal, approve or reject from here.

import { get, post } from "../api.js";
import { announce, duration, exact, fill, h, json, planTable, redraw, runLink, shortId, status, table, when } from "../dom.js";
import { decisionPanel } from "./approvals.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export async function mount(ctx) {
  const id = ctx.params[0];
  const [run, { events }, trigger] = await Promise.all([
    get(`/runs/${id}`),
    get(`/runs/${id}/events`),
    get(`/runs/${id}/trigger`),
  ]);
  const head = h("div", { class: "page-head" });
  const why = h("section", { id: "run-why", "aria-live": "polite" });
  const actions = h("section", { id: "run-actions", "aria-label": "Actions" });
  const summary = h("section", { class: "card", "aria-labelledby": "summary-h" });
  const timeline = h("section", { class: "card", "aria-labelledby": "timeline-h" });
  const history = h("section", { class: "card", "aria-labelledby": "events-h" });
  const data = h("div", { class: "columns" });
  fill(ctx.main, head, why, actions, h("div", { class: "columns" }, summary, triggerCard(trigger)), timeline, data, history);

  let actionsKey = null;
  const draw = async (run, events) => {
    fill(head,
      h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "Runs"), " / ", h("span", { class: "mono" }, run.id)),
      h("h1", {}, run.workflow, " ", status(run.status)));
    fill(why, explain(run));
    const key = `${run.status}:${waitingOn(run)?.name ?? ""}:${waitingOn(run)?.seq ?? ""}`;
    if (key !== actionsKey) {
      actionsKey = key;
      fill(actions, await actionsFor(ctx, run));
    }
    redraw(summary, () => fill(summary, h("h2", { id: "summary-h" }, "Run"), summaryList(run)));
    redraw(timeline, () => drawTimeline(timeline, run));
    fill(data,
      h("section", { class: "card", "aria-labelledby": "input-h" }, h("h2", { id: "input-h" }, "Input"),
        h("p", { class: "help" }, "Values of fields named like secrets are shown as [redacted]."), json(run.input, "Run input")),
      run.input?.["$plan"] === true && Array.isArray(run.output?.plan)
        ? h("section", { class: "card", "aria-labelledby": "output-h" }, h("h2", { id: "output-h" }, "Plan (nothing was changed)"),
          planTable(run.output.plan, "What each step would do"))
        : run.output !== null && run.output !== undefined
        ? h("section", { class: "card", "aria-labelledby": "output-h" }, h("h2", { id: "output-h" }, "Output"), json(run.output, "Run output"))
        : null);
    redraw(history, () => fill(history, h("h2", { id: "events-h" }, "History"), eventsTable(events)));
  };
  await draw(run, events);

  let done = TERMINAL.has(run.status);
  let shown = JSON.stringify([Math.floor(Date.now() / 30000), run, events.length]);
  const refresh = async () => {
    if (done) return;
    const [run, { events }] = await Promise.all([get(`/runs/${id}`), get(`/runs/${id}/events`)]);
    if (ctx.stale()) return;
    const signature = JSON.stringify([Math.floor(Date.now() / 30000), run, events.length]);
    if (signature === shown) return;
    shown = signature;
    await draw(run, events);
    if (TERMINAL.has(run.status)) {
      done = true;
      announce(`The run ${run.status}.`, run.status === "failed" ? "error" : "info");
    }
  };
  return { refresh };
}

/** The step the run waits on, if any. */
function waitingOn(run) {
  return run.steps?.findLast((s) => s.status === "waiting" || s.status === "retrying");
}

/** Why it failed, or what it waits for, in one sentence with the step. */
function explain(run) {
  if (run.status === "failed") {
    const step = run.steps?.find((s) => s.status === "failed" && s.kind !== "undo");
    return h("div", { class: "card why why-failed", id: "why-failed" },
      h("h2", {}, step ? ["Failed at step ", h("a", { href: `#step-${step.seq}`, class: "step-ref", onclick: jump(step.seq) }, step.name)] : "Failed"),
      step ? h("p", { class: "muted" }, `after ${step.attempts} attempt${step.attempts === 1 ? "" : "s"}`) : null,
      h("pre", { class: "error-text" }, run.error ?? step?.last_error ?? "no error recorded"),
      undoSummary(run));
  }
  if (run.status === "cancelled") {
    return h("div", { class: "card why" }, h("h2", {}, "Cancelled"), h("pre", { class: "error-text" }, run.error ?? ""), undoSummary(run));
  }
  const w = waitingOn(run);
  if (!w || run.status === "succeeded") return null;
  const text = {
    signal: [`Waiting for the signal “${w.name}”`, w.wake_at ? [" until ", exact(w.wake_at)] : null],
    sleep: [`Sleeping (${w.name}) until `, exact(w.wake_at)],
    child: ["Waiting for child run ", w.child_run_id ? runLink(w.child_run_id) : "", ` (${w.name})`],
  }[w.kind] ?? (w.status === "retrying"
    ? [`Retrying ${w.name} `, when(w.wake_at), ` after ${w.attempts} failed attempt${w.attempts === 1 ? "" : "s"}: `, h("span", { class: "error-text" }, w.last_error ?? "")]
    : null);
  return text ? h("div", { class: "card why why-waiting" }, h("p", {}, text)) : null;
}

function undoSummary(run) {
  const undos = run.steps?.filter((s) => s.kind === "undo") ?? [];
  if (!undos.length) return null;
  const failed = undos.filter((s) => s.status === "failed");
  return h("p", {}, `${undos.length} undo step${undos.length === 1 ? "" : "s"} ran (`,
    undos.map((s, i) => [i ? ", " : "", h("a", { href: `#step-${s.seq}`, onclick: jump(s.seq) }, s.name)]), ")",
    failed.length ? h("strong", { class: "text-failed" }, `; ${failed.length} failed: ${failed.map((s) => s.name).join(", ")}`) : "; all succeeded", ".");
}

function jump(seq) {
  return (e) => {
    e.preventDefault();
    const row = document.getElementById(`step-${seq}`);
    row?.querySelector("details")?.setAttribute("open", "");
    row?.scrollIntoView({ block: "center" });
    row?.querySelector("summary")?.focus();
  };
}

async function actionsFor(ctx, run) {
  if (TERMINAL.has(run.status) && run.status === "succeeded") return null;
  if (!ctx.me.may.operate) {
    return h("p", { class: "help" }, `You are signed in as ${ctx.me.name} (${ctx.me.role}): you can see this run but not act on it.`);
  }
  const out = [];
  if (run.status === "failed" || run.status === "cancelled") {
    out.push(h("button", { type: "button", onclick: async (e) => {
      e.target.disabled = true;
      try {
        const started = await post(`/runs/${run.id}/retry`);
        announce(started.created ? "Started again as a new run." : "This run was retried already; showing that run.");
        ctx.go(`#/runs/${started.id}`);
      } catch (err) {
        announce(err.message, "error");
        e.target.disabled = false;
      }
    } }, "Retry as a new run"));
  }
  const w = waitingOn(run);
  if (w?.kind === "signal" && w.name === "approval") {
    const { approvals } = await get("/approvals");
    const a = approvals.find((x) => x.run.id === run.id);
    if (a) out.push(decisionPanel(a, () => ctx.go(`#/runs/${run.id}`)));
  } else if (w?.kind === "signal" && !TERMINAL.has(run.status)) {
    out.push(signalForm(run, w.name));
  }
  if (!TERMINAL.has(run.status)) out.push(cancelForm(run));
  return h("div", { class: "actions" }, out);
}

function cancelForm(run) {
  const reason = h("input", { id: "cancel-reason", name: "reason", type: "text", placeholder: "why (recorded)" });
  const confirm = h("div", { class: "confirm", hidden: true },
    h("label", { for: "cancel-reason" }, "Reason"), reason,
    h("button", { type: "submit", class: "danger" }, "Cancel the run"),
    h("button", { type: "button", class: "secondary", onclick: () => { confirm.hidden = true; open.hidden = false; open.focus(); } }, "Keep it running"));
  const open = h("button", { type: "button", class: "danger", onclick: () => { confirm.hidden = false; open.hidden = true; reason.focus(); } }, "Cancel…");
  return h("form", { class: "inline", "aria-label": "Cancel the run", onsubmit: async (e) => {
    e.preventDefault();
    try {
      await post(`/runs/${run.id}/cancel`, { reason: reason.value || undefined });
      announce("Cancellation requested: the step in flight is stopped and completed steps are undone.");
      confirm.hidden = true;
    } catch (err) {
      announce(err.message, "error");
    }
  } }, open, confirm);
}

function signalForm(run, name) {
  const nameInput = h("input", { id: "signal-name", name: "name", type: "text", value: name, required: true });
  const payload = h("textarea", { id: "signal-payload", name: "payload", rows: 3, placeholder: "{}" });
  return h("form", { class: "card signal", "aria-labelledby": "signal-h", onsubmit: async (e) => {
    e.preventDefault();
    let body = {};
    if (payload.value.trim()) {
      try { body = JSON.parse(payload.value); } catch (err) { return announce(`The payload is not JSON: ${err.message}`, "error"); }
    }
    try {
      await post(`/runs/${run.id}/signals/${encodeURIComponent(nameInput.value)}`, body);
      announce(`Signal “${nameInput.value}” sent.`);
    } catch (err) {
      announce(err.message, "error");
    }
  } },
  h("h2", { id: "signal-h" }, "Send a signal"),
  h("div", { class: "field" }, h("label", { for: "signal-name" }, "Signal"), nameInput),
  h("div", { class: "field" }, h("label", { for: "signal-payload" }, "Payload (JSON)"), payload),
  h("button", { type: "submit" }, "Send signal"));
}

function summaryList(run) {
  const took = run.started_at ? (run.finished_at ? Date.parse(run.finished_at) : Date.now()) - Date.parse(run.started_at) : null;
  const row = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  return h("dl", { class: "facts" },
    row("Run id", h("span", { class: "mono" }, run.id)),
    row("Started by", run.started_by),
    row("Created", exact(run.created_at)),
    row("Finished", run.finished_at ? exact(run.finished_at) : "—"),
    row(run.finished_at ? "Took" : "Running for", duration(took)),
    run.parent_run_id ? row("Parent run", runLink(run.parent_run_id)) : null,
    run.concurrency_key ? row("Concurrency key", h("code", {}, run.concurrency_key)) : null,
    run.idempotency_key ? row("Idempotency key", h("code", {}, run.idempotency_key)) : null,
    row("Workflow version", String(run.workflow_version)));
}

function triggerCard(t) {
  const row = (k, v) => [h("dt", {}, k), h("dd", {}, v ?? "—")];
  let facts;
  switch (t.kind) {
    case "schedule":
      facts = [row("Schedule", h("a", { href: "#/schedules" }, t.schedule)),
        t.by_hand ? row("Triggered by hand by", t.triggered_by?.actor ?? "someone") : row("Tick", t.tick ? exact(t.tick.tick) : "—"),
        t.tick ? row("Tick outcome", t.tick.outcome) : null];
      break;
    case "webhook":
      facts = t.delivery
        ? [row("Forge", t.delivery.forge), row("Event", t.delivery.event), row("Repository", t.delivery.repository),
           row("Delivery", t.delivery.delivery_id), row("Received", exact(t.delivery.received_at)),
           row("Runs started by it", String(t.delivery.runs))]
        : [row("Delivery", "no record")];
      break;
    case "alertmanager":
      facts = t.episode
        ? [row("Alert", t.episode.labels?.alertname), row("Route", t.episode.route), row("Target", t.episode.target),
           row("Firing since", exact(t.episode.starts_at)), row("Resolved", t.episode.resolved_at ? exact(t.episode.resolved_at) : "not yet"),
           row("Labels", h("span", { class: "labels" }, Object.entries(t.episode.labels ?? {}).map(([k, v]) => h("code", {}, `${k}=${v}`))))]
        : [row("Alert episode", "no record")];
      break;
    case "parent":
      facts = t.parent ? [row("Parent run", runLink(t.parent.id, `${t.parent.workflow} ${shortId(t.parent.id)}`)),
        row("Parent step", t.parent.step), row("Parent status", status(t.parent.status))] : [row("Parent", "no record")];
      break;
    case "api":
      facts = [row("Caller", t.caller), t.retry_of ? row("Retry of", runLink(t.retry_of)) : null];
      break;
    default:
      facts = [];
  }
  const title = { schedule: "Schedule tick", webhook: "Webhook delivery", alertmanager: "Alert episode", parent: "Parent run", api: "API call" }[t.kind] ?? "Trigger";
  return h("section", { class: "card", id: "run-trigger", "aria-labelledby": "trigger-h" },
    h("h2", { id: "trigger-h" }, `Started by: ${title}`),
    h("dl", { class: "facts" }, row("Recorded as", h("code", {}, t.started_by)), facts));
}

function drawTimeline(section, run) {
  const open = new Set([...section.querySelectorAll("details[open]")].map((d) => d.dataset.seq));
  const steps = run.steps ?? [];
  const t0 = Date.parse(run.started_at ?? run.created_at);
  const ends = steps.map((s) => Date.parse(s.finished_at ?? s.started_at));
  if (run.finished_at) ends.push(Date.parse(run.finished_at));
  if (!TERMINAL.has(run.status)) ends.push(Date.now());
  const t1 = Math.max(t0 + 1, ...ends);
  const span = t1 - t0;
  const rows = steps.map((s) => {
    const start = Date.parse(s.started_at);
    const end = s.finished_at ? Date.parse(s.finished_at) : Date.now();
    const left = Math.min(99.5, Math.max(0, ((start - t0) / span) * 100));
    const width = Math.max(0.5, Math.min(100 - left, ((end - start) / span) * 100));
    const details = h("details", { dataset: { seq: String(s.seq) }, open: open.has(String(s.seq)) },
      h("summary", {}, s.name),
      s.errors?.length
        ? h("ol", { class: "attempt-errors", "aria-label": `Failed attempts of ${s.name}` },
            s.errors.map((e) => h("li", {}, h("span", { class: "muted" }, `attempt ${e.attempt}, `, exact(e.at), ": "), h("span", { class: "error-text" }, e.error))))
        : null,
      s.child_run_id ? h("p", {}, "Child run: ", runLink(s.child_run_id)) : null,
      s.sensitive ? h("p", { class: "help" }, "Sensitive step: its result is never stored.") : null,
      s.output !== null && s.output !== undefined ? json(s.output, `Result of ${s.name}`) : null);
    return h("tr", { id: `step-${s.seq}`, class: s.status === "failed" ? "row-failed" : s.kind === "undo" ? "row-undo" : null },
      h("td", { class: "num" }, String(s.seq)),
      h("td", { class: "step-name" }, details, s.kind !== "step" ? h("span", { class: `badge kind-${s.kind}` }, s.kind) : null,
        s.child_run_id ? [" ", runLink(s.child_run_id, `child run ${shortId(s.child_run_id)}`)] : null),
      h("td", {}, status(s.status)),
      h("td", { class: "num" }, String(s.attempts)),
      h("td", {}, when(s.started_at)),
      h("td", { class: "num" }, duration(s.duration_ms ?? (s.finished_at ? null : end - start))),
      h("td", { class: "bar-cell", "aria-hidden": "true" },
        h("div", { class: "bar-track" }, h("div", { class: `bar bar-${s.status}`, dataset: { left: left.toFixed(2), width: width.toFixed(2) } }))),
      h("td", { class: "error-cell" }, s.last_error && s.status !== "succeeded" ? h("span", { class: "error-text", title: s.last_error }, s.last_error) : ""),
    );
  });
  fill(section, h("h2", { id: "timeline-h" }, "Steps"),
    table("Steps of the run, in the order they ran", ["#", "Step", "Status", "Attempts", "Started", "Took", "Timeline", "Last error"],
      rows.length ? rows : h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No step has run yet.")), { class: "timeline" }));
  // Positions are set through the CSSOM (the Content-Security-Policy allows no inline styles).
  for (const bar of section.querySelectorAll(".bar")) {
    bar.style.marginLeft = `${bar.dataset.left}%`;
    bar.style.width = `${bar.dataset.width}%`;
  }
}

function eventsTable(events) {
  const rows = events.map((e) => h("tr", {},
    h("td", {}, exact(e.at)),
    h("td", {}, e.kind),
    h("td", {}, e.step ?? ""),
    h("td", { class: "num" }, e.attempt ?? ""),
    h("td", { class: "detail" }, e.detail && Object.keys(e.detail).length ? h("code", {}, JSON.stringify(e.detail)) : "")));
  return table("What happened to the run, oldest first", ["At", "Event", "Step", "Attempt", "Detail"], rows);
}

