// The console's shell: sign-in, navigation between pages (by the URL's #fragment),
// and signing out when the token stops working.

import { api, session } from "./api.js";
import { el } from "./dom.js";
import { pages } from "./pages.js";

const signIn = document.getElementById("sign-in");
const nav = document.getElementById("nav");
const page = document.getElementById("page");
let leave = null;

function signedOut(message = "") {
  session.clear();
  if (leave) leave();
  leave = null;
  nav.hidden = page.hidden = true;
  signIn.hidden = false;
  signIn.querySelector('[data-for="token"]').textContent = message;
  signIn.elements.token.focus();
}

async function show() {
  if (!session.token) return signedOut();
  signIn.hidden = true;
  nav.hidden = page.hidden = false;
  const name = Object.hasOwn(pages, location.hash.slice(1)) ? location.hash.slice(1) : "overview";
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.page === name);
  if (leave) leave();
  leave = null;
  const view = el("div", { id: `page-${name}` });  // a page left meanwhile writes to a detached view
  page.replaceChildren(view);
  try {
    leave = (await pages[name](view)) || null;
  } catch (e) {
    if (e.status === 401) return signedOut(e.message);
    view.append(el("p", { class: "error" }, e.message));
  }
}

signIn.addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = signIn.elements.token.value.trim();
  const error = signIn.querySelector('[data-for="token"]');
  error.textContent = "";
  try {
    await api("GET", "/admin/overview", { token });
  } catch (e) {
    error.textContent = e.message;
    return;
  }
  session.set(token);
  signIn.elements.token.value = "";
  show();
});

document.getElementById("sign-out").addEventListener("click", () => signedOut());
window.addEventListener("hashchange", show);
// A button's action that failed (outside a form, which shows its own errors): its message on top of the page.
window.addEventListener("unhandledrejection", (event) => {
  const e = event.reason;
  if (!e || e.status === undefined) return;
  event.preventDefault();
  if (e.status === 401) return signedOut(e.message);
  const banner = el("p", { class: "error", id: "page-error" }, e.message);
  const old = document.getElementById("page-error");
  if (old) old.replaceWith(banner); else page.prepend(banner);
});
show();
