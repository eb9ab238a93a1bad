// Approvals: every run waiting at an approval gate, with what it asks to approve (the plan
// or diff), who may approve and since when, and the decisions so far. Approving or
// rejecting is recorded with the signed-in identity and the comment.

import { get, post } from "../api.js";
import { announce, exact, fill, h, json, planTable, runLink, shortId, table, when } from "../dom.js";

export async function mount(ctx) {
  const list = h("div", { id: "approvals" });
  fill(ctx.main, h("div", { class: "page-head" }, h("h1", {}, "Approvals")), list);
  let shown = null;
  const refresh = async () => {
    const { approvals } = await get("/approvals");
    if (ctx.stale()) return;
    // Redraw only when the set changes, so a comment being typed is not lost.
    const key = JSON.stringify(approvals.map((a) => [a.run.id, a.decisions.length, a.may_decide]));
    if (key === shown) return;
    shown = key;
    fill(list, approvals.length
      ? approvals.map((a) => card(a, refresh))
      : h("p", { class: "empty card" }, "Nothing waits for an approval."));
  };
  await refresh();
  return { refresh };
}

function card(a, refresh) {
  const row = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  const headingId = `approval-${a.run.id}`;
  return h("article", { class: "card approval", "aria-labelledby": headingId, dataset: { run: a.run.id } },
    h("h2", { id: headingId }, a.run.workflow, " ", runLink(a.run.id)),
    h("dl", { class: "facts" },
      row("Waiting since", [when(a.waiting_since), " (", exact(a.waiting_since), ")"]),
      row("Gives up", a.deadline ? [when(a.deadline), " (", exact(a.deadline), ")"] : "never"),
      row("Started by", a.run.started_by),
      a.requested_by ? row("Change made by", `${a.requested_by} (may not approve it)`) : null,
      row("Who may approve", [a.approvers.join(", ") || "nobody is listed", ` — ${a.required ?? 1} approval${a.required === 1 ? "" : "s"} needed`]),
      row("Approved so far", a.approved_by.length ? a.approved_by.join(", ") : "none")),
    a.decisions.length ? decisions(a.decisions) : null,
    h("h3", {}, a.about_kind === "plan" ? "What would change" : "What it will do (the run's input)"),
    about(a),
    decisionPanel(a, refresh));
}

function decisions(list) {
  return h("ul", { class: "decisions", "aria-label": "Decisions so far" },
    list.map((d) => h("li", {},
      h("strong", {}, d.by), d.approve ? " approved" : " rejected",
      d.comment ? [": “", d.comment, "”"] : "",
      d.ignored ? h("span", { class: "muted" }, ` — not counted: ${d.ignored}`) : "")));
}

/** A plan as a diff table when it lists objects (install/upgrade), as its steps for a
 * workflow file, else as JSON. */
function about(a) {
  const plan = a.about;
  if (a.about_kind === "plan" && Array.isArray(plan?.steps)) {
    return planTable(plan.steps, "What the run will do once approved, step by step");
  }
  if (Array.isArray(plan) && plan.every((c) => c && typeof c.object === "string" && typeof c.action === "string")) {
    return table("What applying would change, object by object", ["Object", "Change", "Fields"],
      plan.map((c) => h("tr", { class: `change-${c.action}` },
        h("td", { class: "mono" }, c.object),
        h("td", {}, h("span", { class: `badge action-${c.action}` }, c.action)),
        h("td", {}, c.fields?.length ? h("ul", { class: "fields" }, c.fields.map((f) => h("li", {}, h("code", {}, f)))) : ""))),
      { class: "plan" });
  }
  return json(plan, a.about_kind === "plan" ? "Plan" : "Run input");
}

/** Approve / reject with a comment, for those who may; says why not to the others. */
export function decisionPanel(a, done) {
  if (!a.may_decide) {
    return h("p", { class: "help not-allowed" }, `You cannot decide on this run: ${a.why_not}.`);
  }
  const id = `comment-${a.run.id}`;
  const comment = h("textarea", { id, name: "comment", rows: 2, placeholder: "What you checked, or why not" });
  const decide = (approve) => async (e) => {
    e.preventDefault();
    if (!approve && !comment.value.trim()) {
      announce("Say why in the comment: a rejection ends the run.", "error");
      comment.focus();
      return;
    }
    for (const b of form.querySelectorAll("button")) b.disabled = true;
    try {
      const r = await post(`/runs/${a.run.id}/${approve ? "approve" : "reject"}`, { comment: comment.value.trim() || undefined });
      announce(`${approve ? "Approved" : "Rejected"} as ${r.by}.`);
      await done();
    } catch (err) {
      announce(err.message, "error");
      for (const b of form.querySelectorAll("button")) b.disabled = false;
    }
  };
  const form = h("form", { class: "decision", "aria-label": `Decide on run ${shortId(a.run.id)}` },
    h("label", { for: id }, "Comment (recorded with your name)"), comment,
    h("div", { class: "buttons" },
      h("button", { type: "submit", class: "approve" }, "Approve"),
      h("button", { type: "button", class: "danger", onclick: decide(false) }, "Reject")));
  form.addEventListener("submit", decide(true));
  return form;
}
