// Shared by the sandbox's pages: the API (keys go in the X-Dweet-Auth header, never in a URL),
// the listen stream read with fetch, and the S5D9 board's fields.
"use strict";

const BASE = document.querySelector('meta[name="dweetpipe-base"]').content;

class ApiError extends Error {
  constructor(code, because) { super(because); this.code = code; }
}

function headers(key) {
  return key ? { "X-Dweet-Auth": key } : {};
}

async function api(path, key) {
  const answer = await fetch(BASE + path, { headers: headers(key), cache: "no-store" });
  const body = await answer.json();
  if (body.this !== "succeeded") throw new ApiError(body.with, body.because || "failed");
  return body.with;
}

// Yields each new dweet of `thing` until `signal` aborts or the server ends the stream.
async function* listen(thing, key, signal) {
  const answer = await fetch(BASE + "/listen/for/dweets/from/" + encodeURIComponent(thing),
    { headers: headers(key), signal, cache: "no-store" });
  if ((answer.headers.get("content-type") || "").includes("json")) {
    const body = await answer.json();
    throw new ApiError(body.with, body.because || "failed");
  }
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += decoder.decode(value, { stream: true });
    const lines = pending.split("\r\n");
    pending = lines.pop();
    for (const line of lines) {
      // A frame is a hex length line, then the dweet as a JSON string literal.
      if (!line.startsWith('"')) continue;
      try { yield JSON.parse(JSON.parse(line)); } catch (_) { /* not a dweet line */ }
    }
  }
}

// [dotted path, value] for every leaf of `value`.
function leaves(value, prefix, out) {
  out = out || [];
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [name, inner] of Object.entries(value)) {
      leaves(inner, prefix ? prefix + "." + name : name, out);
    }
  } else {
    out.push([prefix, value]);
  }
  return out;
}

function isBoard(content) {
  const s = content && content.sensors;
  return !!s && (content.globals && content.globals.application === "DweetS5D9Client" ||
    ("TemperatureC" in s && "AccelX" in s));
}

function el(tag, attributes, children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "text") node.textContent = value; else node.setAttribute(name, value);
  }
  for (const child of children || []) node.append(child);
  return node;
}

function metric(label, value, unit) {
  const shown = value === undefined || value === null ? "–" : String(value) + (unit || "");
  return el("div", { class: "metric" }, [el("small", { text: label }), el("span", { class: "value", text: shown })]);
}

// An S5D9 board's tile body: the sensors as the board shows them.
function boardView(content) {
  const s = content.sensors || {};
  const led = el("span", { class: "led" + (Number(s.LED) ? " on" : "") });
  return el("div", { class: "board" }, [
    el("div", { class: "big metric" }, [el("small", { text: "temperature" }),
      el("span", { class: "value", text: s.TemperatureC === undefined ? "–" : s.TemperatureC + " °C" })]),
    metric("humidity", s.Humidity, " %"),
    metric("pressure", s.Pressure, " hPa"),
    metric("sound", s.SoundLevel, " dB"),
    el("div", { class: "metric" }, [el("small", { text: "LED" }), led, el("span", { text: Number(s.LED) ? "on" : "off" })]),
    metric("acceleration", [s.AccelX, s.AccelY, s.AccelZ].join(" / "), " g"),
    metric("magnetic field", [s.MagX, s.MagY, s.MagZ].join(" / "), " µT"),
  ]);
}

// Any other thing's tile body: its numeric fields.
function numbersView(content) {
  const rows = leaves(content, "").filter(([, v]) => typeof v === "number").slice(0, 8)
    .map(([path, v]) => el("tr", {}, [el("td", { text: path }), el("td", { class: "value", text: String(v) })]));
  return rows.length ? el("table", { class: "fields" }, rows) : el("p", { class: "muted", text: "no numeric fields" });
}

function ago(created) {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(created)) / 1000));
  return seconds < 60 ? seconds + " s ago" : Math.round(seconds / 60) + " min ago";
}
