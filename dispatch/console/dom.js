// Building the page: every value goes in as a text node, never as markup.

/** An element with attributes (on* become listeners) and children (strings become text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A table: columns are {label, value(row), kind: "num" | "id" | undefined}. */
export function table(columns, rows, empty = "nothing here") {
  if (!rows.length) return el("p", { class: "empty" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { class: c.kind }, c.label)))),
    el("tbody", {}, rows.map((row) => el("tr", { "data-id": columns[0].value(row) },
      columns.map((c) => el("td", { class: c.kind }, c.value(row)))))));
}

export function flag(value) {
  return el("span", { class: `flag ${value}` }, value.replace(/_/g, " "));
}

export function fixed(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

/**
 * A form of labelled fields whose submit calls onSubmit(values). An API error is
 * shown next to the field its message names (or under the form); the button is
 * disabled while the call runs, and nothing is kept from a failed call.
 * fields: {name, label, type?, required?, options?: [[value, text]], value?}
 */
export function form(fields, submit, onSubmit, { cls = "inline", id } = {}) {
  const errors = {};
  const button = el("button", { type: "submit", class: "primary" }, submit);
  const formError = el("p", { class: "error", "data-for": "_form" });
  const node = el("form", { class: cls, id, novalidate: true },
    fields.map((f) => {
      const input = f.options
        ? el("select", { name: f.name }, f.options.map(([v, t]) => el("option", { value: v }, t)))
        : el("input", { name: f.name, type: f.type || "text", required: f.required, value: f.value,
                        accept: f.accept, autocomplete: "off" });
      errors[f.name] = el("p", { class: "error", "data-for": f.name });
      return el("label", {}, f.label, input, errors[f.name]);
    }),
    el("div", {}, button, formError));
  node.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const p of [formError, ...Object.values(errors)]) p.textContent = "";
    const values = {};
    for (const f of fields) {
      const input = node.elements[f.name];
      values[f.name] = f.type === "file" ? input.files[0] : input.value.trim();
    }
    button.disabled = true;
    try {
      await onSubmit(values, node);
    } catch (e) {
      const named = fields.find((f) => new RegExp(`\\b${f.name}\\b`).test(e.message));
      (named ? errors[named.name] : formError).textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  return node;
}

/** A button that asks to be clicked twice before it runs action(). */
export function confirmButton(label, question, action, cls = "danger") {
  const button = el("button", { type: "button", class: cls }, label);
  let armed = false;
  button.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      button.textContent = question;
      return;
    }
    button.disabled = true;
    try { await action(); } finally { button.disabled = false; armed = false; button.textContent = label; }
  });
  return button;
}

/** An integer from a form field, or the text itself (for the API to refuse with its own message). */
export function int(text) {
  return /^-?\d+$/.test(text) ? Number(text) : text;
}
