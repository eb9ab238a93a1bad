// One workflow: what it does, a form to start a run (made from its input schema, with plan
// mode for a workflow file), its versions with the runs on each, and its current text.

import { get, post } from "../api.js";
import { announce, exact, fill, h, runLink, table, when } from "../dom.js";

export async function mount(ctx) {
  const name = decodeURIComponent(ctx.params[0]);
  const w = await get(`/workflows/${encodeURIComponent(name)}`);
  const versions = w.versions.length
    ? table("Versions", ["Version", "First loaded", "Runs", "Still going"], w.versions.map((v) => h("tr", { dataset: { version: v.version } },
      h("th", { scope: "row" }, `v${v.version}`, v.current ? h("span", { class: "badge status-active" }, " current") : ""),
      h("td", {}, v.loaded_at ? [when(v.loaded_at), " (", exact(v.loaded_at), ")"] : h("span", { class: "muted" }, "built in")),
      h("td", {}, Object.entries(v.runs).map(([status, n]) => h("span", { class: `badge status-${status}` }, `${n} ${status}`))),
      h("td", {}, v.in_flight.length ? v.in_flight.map((id) => [runLink(id), " "]) : h("span", { class: "muted" }, "none")))),
    { class: "versions" })
    : h("p", { class: "muted" }, "No run has started on it yet.");
  fill(ctx.main,
    h("div", { class: "page-head" }, h("h1", {}, w.name)),
    h("p", {}, w.description),
    h("h2", {}, "Start a run"),
    w.may_start ? startForm(w, ctx) : h("p", { class: "help not-allowed" }, `You cannot start it: ${w.why_not}.`),
    h("h2", {}, "Versions"),
    versions,
    w.source ? [h("h2", {}, "Definition"), w.path ? h("p", { class: "muted mono" }, w.path) : null,
      h("pre", { class: "source", tabindex: "0", "aria-label": "The workflow file" }, w.source)] : null);
  return {};
}

/** The start form: one control per input field of the schema (a JSON box without one). */
function startForm(w, ctx) {
  const schema = w.input_schema;
  const controls = [];
  const read = [];
  if (schema) {
    for (const [field, p] of Object.entries(schema.properties ?? {})) {
      const id = `input-${field}`;
      const required = (schema.required ?? []).includes(field);
      const hint = [p.description, p["x-dayshift-guarded"] ? "the policy decides which values you may give" : null]
        .filter(Boolean).join(" — ");
      let control;
      if (p.enum) {
        control = h("select", { id, name: field },
          required ? null : h("option", { value: "" }, "(default)"),
          p.enum.map((v) => h("option", { value: JSON.stringify(v), selected: p.default === v ? "" : null }, String(v))));
        read.push([field, () => (control.value === "" ? undefined : JSON.parse(control.value))]);
      } else if (p.type === "boolean") {
        control = h("input", { id, name: field, type: "checkbox", checked: p.default ? "" : null });
        read.push([field, () => control.checked]);
      } else if (p.type === "integer" || p.type === "number") {
        control = h("input", { id, name: field, type: "number", step: p.type === "integer" ? "1" : "any", value: p.default ?? "" });
        read.push([field, () => (control.value === "" ? undefined : Number(control.value))]);
      } else if (p.type === "array" || p.type === "object") {
        control = h("textarea", { id, name: field, rows: 2, class: "mono", placeholder: p.type === "array" ? "[\"a\", \"b\"]" : "{}" },
          p.default === undefined ? "" : JSON.stringify(p.default));
        read.push([field, () => (control.value.trim() === "" ? undefined : parseJson(field, control.value))]);
      } else {
        control = h("input", { id, name: field, type: "text", value: p.default ?? "" });
        read.push([field, () => (control.value === "" && !required ? undefined : control.value)]);
      }
      controls.push(h("div", { class: "field" },
        h("label", { for: id }, field, required ? " (required)" : ""), control,
        hint ? h("p", { class: "help" }, hint) : null));
    }
  } else {
    const box = h("textarea", { id: "input-json", name: "input", rows: 4, class: "mono" }, "{}");
    controls.push(h("div", { class: "field" }, h("label", { for: "input-json" }, "Input (JSON)"), box));
    read.push([null, () => parseJson("input", box.value)]);
  }
  const plan = schema ? h("input", { id: "start-plan", name: "plan", type: "checkbox" }) : null;
  const form = h("form", { class: "start card", "aria-label": `Start a run of ${w.name}` },
    controls,
    plan ? h("div", { class: "field" }, h("label", { for: "start-plan" }, plan, " Plan only: say what each step would do, change nothing")) : null,
    h("div", { class: "buttons" }, h("button", { type: "submit" }, "Start")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let input = {};
    try {
      for (const [field, value] of read) {
        const v = value();
        if (field === null) input = v;
        else if (v !== undefined) input[field] = v;
      }
    } catch (err) {
      return announce(err.message, "error");
    }
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const r = await post("/runs", { workflow: w.name, input, plan: plan?.checked ?? false });
      announce(`Started run ${r.id}${plan?.checked ? " (a plan: nothing is changed)" : ""}.`);
      ctx.go(`#/runs/${r.id}`);
    } catch (err) {
      announce(err.message, "error");
      button.disabled = false;
    }
  });
  return form;
}

function parseJson(field, text) {
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`${field}: not JSON (${text.trim().slice(0, 40)})`);
  }
}

