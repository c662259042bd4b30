// One function per page: it fills the view it is given and may return a function
// to call when the page is left. Codes are never asked for, so never shown.

import { all, api, upload } from "./api.js";
import { drawChart } from "./chart.js";
import { confirmButton, el, fixed, flag, form, int, table, when } from "./dom.js";

const q = encodeURIComponent;

/** A paged list: the first page, then "More" for each next_cursor. */
async function paged(path, key, render, limit = 50) {
  const box = el("div");
  let cursor = null;
  const more = el("button", { type: "button" }, "More");
  async function load() {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api("GET", `${path}${sep}limit=${limit}` + (cursor ? `&cursor=${q(cursor)}` : ""));
    box.append(render(page[key]));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  }
  more.addEventListener("click", load);
  await load();
  return el("div", {}, box, more);
}

function figure(label, value) {
  return el("div", { class: "figure" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

// ---- overview -------------------------------------------------------------------------

async function overview(view) {
  const figures = el("div", { class: "figures" });
  const canvas = el("canvas", { id: "rates", width: 900, height: 220 });
  const health = el("div", { class: "panel", id: "store-health" });
  const refusals = el("div", { id: "refusals" });
  view.append(el("h2", {}, "Overview"), figures,
    el("div", { class: "legend" }, el("span", { class: "orders" }, "— orders / s"),
      el("span", { class: "codes" }, "— codes delivered / s")),
    canvas, el("h3", {}, "Store"), health, el("h3", {}, "Refusals since start"), refusals);
  const points = 90;
  const orders = [], codes = [];
  async function tick() {
    const { live, store } = await api("GET", "/admin/overview");
    figures.replaceChildren(
      figure("orders / s", fixed(live.orders_per_s, 2)), figure("codes delivered / s", fixed(live.codes_per_s, 2)),
      figure("p50 order latency (ms)", fixed(live.p50_ms, 2)), figure("p99 order latency (ms)", fixed(live.p99_ms, 2)),
      figure("orders since start", live.orders), figure("codes since start", live.codes));
    orders.push(live.orders_per_s);
    codes.push(live.codes_per_s);
    if (orders.length > points) { orders.shift(); codes.shift(); }
    drawChart(canvas, [{ values: orders, color: "#2457c5" }, { values: codes, color: "#067647" }], points);
    health.replaceChildren(
      el("p", {}, "Redis: ", flag(store.status), ` answered in ${fixed(store.latency_ms, 2)} ms`),
      el("p", {}, `Webhook deliveries waiting: ${store.webhooks_due ?? "–"}, failed: ${store.webhooks_failed ?? "–"}`),
      el("p", { class: "empty" }, `Figures of this daemon process over the last ${live.window_s} s.`));
    const rows = Object.entries(live.refusals);
    refusals.replaceChildren(table([{ label: "reason", value: (r) => r[0] }, { label: "orders", value: (r) => r[1], kind: "num" }],
      rows, "no order refused"));
  }
  await tick();
  const timer = setInterval(() => tick().catch(() => {}), 2000);
  return () => clearInterval(timer);
}

// ---- stock ----------------------------------------------------------------------------

async function stock(view) {
  const batches = el("div", { id: "batches" });
  const report = el("div", { id: "import-report" });
  const skuColumns = [
    { label: "SKU", value: (s) => s.sku, kind: "id" },
    { label: "name", value: (s) => s.name },
    { label: "stock", value: (s) => flag(s.stock.stock_status) },
    { label: "available", value: (s) => s.stock.available, kind: "num" },
    { label: "reserved", value: (s) => s.stock.reserved, kind: "num" },
    { label: "sold", value: (s) => s.stock.sold, kind: "num" },
    { label: "voided", value: (s) => s.stock.voided, kind: "num" },
    { label: "invalidated", value: (s) => s.stock.invalidated, kind: "num" },
    { label: "parked", value: (s) => s.stock.parked, kind: "num" },
    { label: "low at", value: (s) => s.low_stock_threshold, kind: "num" },
    { label: "sold / day", value: (s) => fixed(s.stock.forecast && s.stock.forecast.daily_velocity, 2), kind: "num" },
    { label: "days of cover", value: (s) => fixed(s.stock.forecast && s.stock.forecast.days_of_cover), kind: "num" },
    { label: "reorder", value: (s) => s.stock.forecast ? s.stock.forecast.reorder_qty : "–", kind: "num" },
    { label: "", value: (s) => el("button", { type: "button", onclick: () => showBatches(s.sku) }, "Batches") },
  ];
  async function showBatches(sku) {
    const { batches: rows } = await api("GET", `/admin/skus/${q(sku)}/batches`);
    batches.replaceChildren(el("h3", {}, `Batches of ${sku}`), table([
      { label: "batch", value: (b) => b.batch_id, kind: "id" },
      { label: "supplier", value: (b) => b.supplier },
      { label: "unit cost", value: (b) => b.unit_cost, kind: "num" },
      { label: "status", value: (b) => flag(b.status) },
      { label: "accepted", value: (b) => b.accepted, kind: "num" },
      { label: "duplicate", value: (b) => b.duplicate, kind: "num" },
      { label: "malformed", value: (b) => b.malformed, kind: "num" },
      { label: "delivered", value: (b) => b.delivered, kind: "num" },
      { label: "invalidated", value: (b) => b.invalidated, kind: "num" },
      { label: "voided", value: (b) => b.voided, kind: "num" },
      { label: "imported", value: (b) => when(b.created_at) },
      { label: "", value: (b) => b.status === "voided" ? "" : confirmButton("Void", "Void its unsold codes?", async () => {
        await api("POST", `/admin/batches/${q(b.batch_id)}/void`);
        await refresh();
        await showBatches(sku);
      }) },
    ], rows, "no batch yet"));
  }
  const list = el("div", { id: "skus" });
  async function refresh() {
    list.replaceChildren(await paged("/admin/skus", "skus", (rows) => table(skuColumns, rows, "no SKU yet")));
  }
  const [skus, suppliers] = await Promise.all([all("/admin/skus", "skus"), all("/admin/suppliers", "suppliers")]);
  const progress = el("progress", { max: 1, value: 0, hidden: true });
  const importForm = form([
    { name: "sku", label: "SKU", options: skus.map((s) => [s.sku, `${s.sku} (${s.name})`]) },
    { name: "supplier", label: "supplier", options: suppliers.map((s) => [s.supplier, `${s.supplier} (${s.name})`]) },
    { name: "unit_cost", label: "unit cost (minor units)", required: true },
    { name: "batch_id", label: "batch id (optional; resend to resume)" },
    { name: "format", label: "format", options: [["text/plain", "text: one code a line"], ["text/csv", "CSV with a code column"]] },
    { name: "file", label: "file", type: "file", required: true },
  ], "Upload", async (v) => {
    if (!v.file) throw new Error("choose a file to upload");
    const query = `sku=${q(v.sku)}&supplier=${q(v.supplier)}&unit_cost=${q(v.unit_cost)}` +
      (v.batch_id ? `&batch_id=${q(v.batch_id)}` : "");
    progress.hidden = false;
    progress.value = 0;
    report.replaceChildren();
    try {
      const { data } = await upload(`/admin/batches?${query}`, v.file, v.format, (sent, total) => {
        progress.value = total ? sent / total : 0;
      });
      progress.value = 1;
      showReport(data);
      await refresh();
      await showBatches(data.sku);
    } finally {
      progress.hidden = true;
    }
  }, { id: "import-form" });
  function showReport(r) {
    report.replaceChildren(el("div", { class: "panel" },
      el("p", { class: "notice" }, `Batch ${r.batch_id}${r.replayed ? " (sent before: nothing added)" : ""}: ` +
        `${r.accepted} accepted, ${r.duplicate} duplicate, ${r.malformed} malformed.`),
      r.malformed_lines.length ? table([{ label: "line", value: (m) => m.line, kind: "num" },
        { label: "why it was skipped", value: (m) => m.reason }], r.malformed_lines) : "",
      r.malformed_truncated ? el("p", { class: "empty" }, "(only the first malformed lines are listed)") : ""));
  }
  await refresh();
  view.append(el("h2", {}, "Stock"), list, batches, el("h3", {}, "Import codes"), importForm, progress, report);
}

// ---- suppliers ------------------------------------------------------------------------

async function suppliers(view) {
  const panel = el("div", { id: "supplier-panel" });
  const list = el("div");
  async function refresh() {
    list.replaceChildren(await paged("/admin/suppliers", "suppliers", (rows) => table([
      { label: "supplier", value: (s) => s.supplier, kind: "id" },
      { label: "name", value: (s) => s.name },
      { label: "status", value: (s) => flag(s.status) },
      { label: "deposit", value: (s) => s.deposit, kind: "num" },
      { label: "delivered", value: (s) => s.delivered, kind: "num" },
      { label: "invalidated", value: (s) => s.invalidated, kind: "num" },
      { label: "invalid rate %", value: (s) => fixed(100 * s.invalid_rate, 2), kind: "num" },
      { label: "rating", value: (s) => fixed(s.rating), kind: "num" },
      { label: "", value: (s) => el("button", { type: "button", onclick: () => manage(s.supplier) }, "Manage") },
    ], rows, "no supplier yet")));
  }
  async function manage(id) {
    const s = await api("GET", `/admin/suppliers/${q(id)}`);
    const done = async () => { await refresh(); await manage(id); };
    panel.replaceChildren(el("div", { class: "panel" },
      el("h3", {}, `${s.name} (${s.supplier}): `, flag(s.status)),
      s.blacklist_reason ? el("p", {}, `Blacklisted: ${s.blacklist_reason}`) : "",
      el("p", {}, `Deposit ${s.deposit}, rating ${fixed(s.rating)}`),
      form([{ name: "amount", label: "top up the deposit by (minor units)", required: true },
            { name: "reference", label: "payment reference", required: true }], "Top up", async (v) => {
        await api("POST", `/admin/suppliers/${q(id)}/deposit`, { json: { amount: int(v.amount), reference: v.reference } });
        await done();
      }, { id: "deposit-form" }),
      s.status === "active"
        ? form([{ name: "reason", label: "why (kept with the blacklisting)", required: true }], "Blacklist", async (v) => {
          await api("PATCH", `/admin/suppliers/${q(id)}`, { json: { status: "blacklisted", reason: v.reason } });
          await done();
        }, { id: "blacklist-form" })
        : el("p", {}, confirmButton("Reinstate", "Put its parked codes back on sale?", async () => {
          await api("PATCH", `/admin/suppliers/${q(id)}`, { json: { status: "active" } });
          await done();
        }, ""))));
  }
  await refresh();
  view.append(el("h2", {}, "Suppliers"), list, panel);
}

// ---- distributors ---------------------------------------------------------------------

async function distributors(view) {
  const panel = el("div", { id: "distributor-panel" });
  const list = el("div");
  async function refresh() {
    list.replaceChildren(await paged("/admin/distributors", "distributors", (rows) => table([
      { label: "distributor", value: (d) => d.distributor, kind: "id" },
      { label: "name", value: (d) => d.name },
      { label: "tier", value: (d) => d.tier ?? "–" },
      { label: "status", value: (d) => flag(d.status) },
      { label: "balance", value: (d) => d.balance, kind: "num" },
      { label: "held", value: (d) => d.held, kind: "num" },
      { label: "credit limit", value: (d) => d.credit_limit, kind: "num" },
      { label: "requests / s", value: (d) => d.rate_limit || "unlimited", kind: "num" },
      { label: "", value: (d) => el("button", { type: "button", onclick: () => manage(d.distributor) }, "Manage") },
    ], rows, "no distributor yet")));
  }
  async function manage(id, key = null) {
    const d = await api("GET", `/admin/distributors/${q(id)}`);
    const done = async () => { await refresh(); await manage(id); };
    const next = d.status === "active" ? "suspended" : "active";
    panel.replaceChildren(el("div", { class: "panel" },
      el("h3", {}, `${d.name} (${d.distributor}): `, flag(d.status)),
      el("p", {}, `Balance ${d.balance}, held ${d.held}, credit limit ${d.credit_limit}`),
      key ? el("div", { class: "secret", id: "new-key" }, el("p", {}, "New API key, shown once: give it to the distributor now."),
        el("p", {}, key)) : "",
      form([{ name: "amount", label: "top up by (minor units)", required: true },
            { name: "reference", label: "payment reference", required: true }], "Top up", async (v) => {
        await api("POST", `/admin/distributors/${q(id)}/topup`, { json: { amount: int(v.amount), reference: v.reference } });
        await done();
      }, { id: "topup-form" }),
      el("p", {},
        confirmButton(next === "suspended" ? "Suspend" : "Reactivate",
          next === "suspended" ? "Stop its orders now?" : "Let it order again?", async () => {
            await api("PATCH", `/admin/distributors/${q(id)}`, { json: { status: next } });
            await done();
          }, next === "suspended" ? "danger" : ""),
        " ",
        confirmButton("Rotate API key", "The old key stops working: rotate?", async () => {
          const { api_key: fresh } = await api("POST", `/admin/distributors/${q(id)}/keys`);
          await manage(id, fresh);
        }))));
  }
  await refresh();
  view.append(el("h2", {}, "Distributors"), list, panel);
}

// ---- tickets --------------------------------------------------------------------------

async function tickets(view) {
  const panel = el("div", { id: "ticket-panel" });
  const list = el("div");
  async function refresh() {
    list.replaceChildren(await paged("/admin/tickets?status=open", "tickets", (rows) => table([
      { label: "ticket", value: (t) => t.ticket_id, kind: "id" },
      { label: "distributor", value: (t) => t.distributor },
      { label: "order", value: (t) => t.order_id, kind: "id" },
      { label: "SKU", value: (t) => t.sku },
      { label: "code #", value: (t) => t.code_index, kind: "num" },
      { label: "reason", value: (t) => t.reason },
      { label: "opened", value: (t) => when(t.created_at) },
      { label: "", value: (t) => el("button", { type: "button", onclick: () => resolve(t) }, "Resolve") },
    ], rows, "no open ticket")));
  }
  function resolve(t) {
    const outcome = el("p", { class: "notice", id: "ticket-outcome" });
    const decide = (decision, replace) => async (v) => {
      const done = await api("POST", `/admin/tickets/${q(t.ticket_id)}/resolve`,
        { json: { decision, replace, note: v.note || undefined } });
      outcome.textContent = `Ticket ${done.ticket_id} ${done.status}` + (done.outcome ? ` (${done.outcome})` : "") +
        (done.refund ? `, ${done.refund} refunded` : "") + ".";
      await refresh();
    };
    const note = [{ name: "note", label: "note (optional, kept with the decision)" }];
    panel.replaceChildren(el("div", { class: "panel" },
      el("h3", {}, `Ticket ${t.ticket_id}`),
      el("p", {}, `${t.distributor}, order ${t.order_id}, code #${t.code_index} of ${t.sku}: ${t.reason}`),
      form(note, "Approve: refund", decide("approve", false), { id: "approve-refund" }),
      form(note, "Approve: replace the code", decide("approve", true), { id: "approve-replace" }),
      form(note, "Reject", decide("reject", undefined), { id: "reject" }),
      outcome));
  }
  await refresh();
  view.append(el("h2", {}, "Open tickets"), list, panel);
}

// ---- webhooks -------------------------------------------------------------------------

async function webhooks(view) {
  const list = el("div", { id: "failed" });
  const notice = el("p", { class: "notice", id: "replay-notice" });
  async function refresh() {
    const { deliveries } = await api("GET", "/admin/webhooks/failed?limit=1000");
    list.replaceChildren(table([
      { label: "job", value: (f) => f.job_id, kind: "id" },
      { label: "target", value: (f) => f.target },
      { label: "event", value: (f) => f.type },
      { label: "entity", value: (f) => f.entity, kind: "id" },
      { label: "version", value: (f) => f.version, kind: "num" },
      { label: "tries", value: (f) => f.attempts, kind: "num" },
      { label: "last error", value: (f) => f.last_error },
      { label: "failed at", value: (f) => when(f.failed_at) },
      { label: "", value: (f) => el("button", { type: "button", onclick: async () => {
        const { replayed } = await api("POST", `/admin/webhooks/failed/${q(f.job_id)}/replay`);
        notice.textContent = `${replayed} delivery will be tried again now.`;
        await refresh();
      } }, "Replay") },
    ], deliveries, "no failed delivery"));
  }
  const replayAll = el("button", { type: "button", onclick: async () => {
    const { replayed } = await api("POST", "/admin/webhooks/failed/replay");
    notice.textContent = `${replayed} deliveries will be tried again now.`;
    await refresh();
  } }, "Replay all");
  await refresh();
  view.append(el("h2", {}, "Failed webhook deliveries"), list, el("p", {}, replayAll), notice);
}

export const pages = { overview, stock, suppliers, distributors, tickets, webhooks };
