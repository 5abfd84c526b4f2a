// The gateway's HTTP API as the playground uses it: the API key, JSON calls that turn
// problem+json answers into ApiError, and a job's Server-Sent Events read with fetch (EventSource
// cannot send an Authorization header).

const KEY_NAME = "edm-serve.api-key";

export class ApiError extends Error {
  // status: HTTP status (0: the network failed); problem: the problem+json body, when there was one
  constructor(status, problem, fallback) {
    super((problem && (problem.detail || problem.title)) || fallback || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || null;
    this.field = (problem && problem.field) || null;
  }
}

// The key lives in sessionStorage (gone when the tab closes) unless the user asked to remember it.
export const apiKey = {
  get() {
    return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
  },
  where() {
    if (localStorage.getItem(KEY_NAME)) return "remembered on this device";
    return sessionStorage.getItem(KEY_NAME) ? "kept until this tab closes" : "";
  },
  set(key, remember) {
    this.forget();
    (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
  },
  forget() {
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
  },
};

function headers(extra) {
  const out = { ...extra };
  const key = apiKey.get();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorOf(response) {
  let problem = null;
  try {
    problem = await response.json();
  } catch {
    problem = null;
  }
  return new ApiError(response.status, problem, response.statusText);
}

async function send(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, null, `the gateway did not answer (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path) {
  return (await send("GET", path)).json();
}

export async function postJSON(path, body) {
  return (await send("POST", path, body)).json();
}

export async function getBlob(path) {
  return (await send("GET", path)).blob();
}

// One SSE block ("id: ...\nevent: ...\ndata: ...") -> {id, type, data}; null for a comment.
function parseBlock(block) {
  let id = "";
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "id") id = value;
    else if (name === "event") type = value;
    else if (name === "data") data.push(value);
  }
  if (!data.length) return null;
  return { id, type, data: JSON.parse(data.join("\n")) };
}

// Calls onEvent({id, type, data}) for each event of a job until its done or error event, or until
// `signal` aborts. A dropped connection is resumed after the last event seen (Last-Event-ID).
export async function watchJob(jobId, onEvent, signal) {
  let last = "";
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
        headers: headers({ Accept: "text/event-stream", ...(last ? { "Last-Event-ID": last } : {}) }),
        cache: "no-store",
        signal,
      });
    } catch (error) {
      if (signal && signal.aborted) return;
      if (attempt >= 5) throw new ApiError(0, null, `lost the event stream (${error.message})`);
      await new Promise((resolve) => setTimeout(resolve, 500 * (attempt + 1)));
      continue;
    }
    if (response.status === 204) return;
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          if (event.id) last = event.id;
          onEvent(event);
          if (event.type === "done" || event.type === "error") return;
        }
      }
    } catch (error) {
      if (signal && signal.aborted) return;
      if (attempt >= 5) throw new ApiError(0, null, `lost the event stream (${error.message})`);
    }
  }
}
