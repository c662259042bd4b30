// The admin API as the console calls it: the token lives in this tab's sessionStorage
// and goes in the Authorization header, never in a URL.

const KEY = "dispatch.adminToken";

export const session = {
  get token() { return sessionStorage.getItem(KEY); },
  set(token) { sessionStorage.setItem(KEY, token); },
  clear() { sessionStorage.removeItem(KEY); },
};

/** An error answer of the API: its status, its code and its own message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function failure(status, data) {
  const e = data && data.error;
  return e ? new ApiError(status, e.code, e.message) : new ApiError(status, "http_" + status, `HTTP ${status}`);
}

/** JSON in, JSON out; throws ApiError for an error answer. */
export async function api(method, path, { json, token } = {}) {
  const headers = { Authorization: `Bearer ${token ?? session.token ?? ""}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "network", "the daemon did not answer");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw failure(response.status, data);
  return data;
}

/** Every item of a paged admin list (following next_cursor). */
export async function all(path, key) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api("GET", `${path}${sep}limit=500` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items.push(...page[key]);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

/** POST a file as the body (streamed by the daemon), telling onProgress(sent, total). */
export function upload(path, file, contentType, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${session.token ?? ""}`);
    xhr.setRequestHeader("Content-Type", contentType);
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onerror = () => reject(new ApiError(0, "network", "the daemon did not answer"));
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve({ status: xhr.status, data });
      else reject(failure(xhr.status, data));
    };
    xhr.send(file);
  });
}
