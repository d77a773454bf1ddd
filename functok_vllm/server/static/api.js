// Calls to this server's API: the API key, errors in words, and streaming (server-sent events over fetch).

const KEY_NAME = "functok-api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

// Called with the ApiError of every 401, so the page can ask for a key (set by main.js).
let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

// An error from the API or the network. `status` is 0 for a network failure or an error event inside a stream.
export class ApiError extends Error {
  constructor(status, message, { type = null, param = null, code = null, retryAfter = null } = {}) {
    super(message);
    Object.assign(this, { status, type, param, code, retryAfter });
  }

  // One or two sentences a person can act on.
  describe() {
    const m = this.message;
    const field = this.param && !m.includes(this.param) ? ` (field: ${this.param})` : ""; // most messages name it
    const s = this.status;
    if (s === 0 && this.code === "network") return `Could not reach the server: ${m}. Is functok serve still running?`;
    if (s === 0) return `The stream stopped with an error${this.code ? ` (${this.code})` : ""}: ${m}`;
    if (s === 400 || s === 422) return `The server refused the request (${s})${field}: ${m}`;
    if (s === 401) return `This server needs a valid API key (401): ${m}. Enter it in the form at the top.`;
    if (s === 404) return `Not found (404)${field}: ${m}`;
    if (s === 413) return `The request is too large (413): ${m}`;
    if (s === 429) {
      const wait = this.retryAfter ? ` Try again in ${this.retryAfter} s.` : " Try again shortly.";
      return `The server is busy (429): ${m}.${wait}`;
    }
    if (s === 501) return `Not available on this server (501): ${m}`;
    if (s === 503) return `The server is unavailable (503): ${m}`;
    if (s === 504) return `The server gave up waiting (504): ${m}`;
    if (s >= 500) return `The server failed (${s}): ${m}`;
    return `The request failed (${s})${field}: ${m}`;
  }
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// An ApiError from a non-2xx response, reading the OpenAI-style body when there is one.
async function errorFrom(response) {
  let text = "";
  try {
    text = await response.text();
  } catch (e) {
    text = String(e);
  }
  let err = null;
  try {
    err = JSON.parse(text).error;
  } catch (e) {
    err = null;
  }
  const message = (err && err.message) || text.slice(0, 300) || response.statusText || "no details";
  const error = new ApiError(response.status, message, {
    type: err && err.type,
    param: err && err.param,
    code: err && err.code,
    retryAfter: response.headers.get("Retry-After"),
  });
  if (response.status === 401) onUnauthorized(error);
  return error;
}

async function send(path, options) {
  try {
    return await fetch(path, options);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, e.message || String(e), { code: "network" });
  }
}

// GET or POST JSON; resolves to {status, body} for 2xx (202 included), throws ApiError otherwise.
export async function request(path, body = undefined, signal = undefined) {
  const options = { headers: headers(body !== undefined), signal };
  if (body !== undefined) Object.assign(options, { method: "POST", body: JSON.stringify(body) });
  const response = await send(path, options);
  if (!response.ok) throw await errorFrom(response);
  return { status: response.status, body: await response.json(), retryAfter: response.headers.get("Retry-After") };
}

// POST a body with "stream": true and call onChunk(object) for each event until `data: [DONE]`.
// An error event inside the stream ({"error": ...}) is thrown as an ApiError with status 0.
export async function stream(path, body, onChunk, signal) {
  const response = await send(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(0, "the connection closed before the end of the stream", { code: "network" });
    buffer += decoder.decode(value, { stream: true });
    // Events are separated by a blank line; keep a partial last event in the buffer.
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new ApiError(0, obj.error.message, { code: obj.error.code, type: obj.error.type });
      onChunk(obj);
    }
  }
}
