// Data access for the Health tab: fetches, caches and merges deltas. No DOM here.
//
// Every URL is relative: the page's <base href="plugin/tbhealth/"> makes `./runs` resolve to
// `/data/plugin/tbhealth/runs`, which keeps working under --path_prefix and behind proxies.
// Failed requests resolve to null (the page keeps showing the last good data) rather than throw.

/** @typedef {{run: string, state: string, epoch: ?number, total_epochs: ?number, progress: ?number,
 *   eta_s: ?number, val_loss: ?(number|string), val_acc: ?(number|string), alerts_active: ?number,
 *   health_score: ?number, updated_at: ?number}} RunSummary */
/** @typedef {{id: string, rule: string, severity: string, message: string, epoch: ?number,
 *   step: ?number, time: number, layer: ?string, value: *, threshold: *, resolved: boolean}} Alert */
/** @typedef {{time: number, level: string, message: string}} LogRecord */
/** @typedef {{kind: string, step: ?number, epoch: ?number, epoch_x: ?number, time: ?number}} RunEvent
 *   plus kind-specific fields (http_api.md, GET events). */
/** @typedef {{live: string[], running: string[], final: string[], all: string[]}} States */
/** @typedef {{read_only: boolean, commands: string[], states: States, metric_keys: string[],
 *   severities: string[]}} Config */

/** Most log records kept in memory (and on screen) per run. */
export const MAX_LOG_RECORDS = 2000;
/** Series the run page charts; asking for only these keeps each poll small. */
const CHART_TAGS = 'train/loss,val/loss,train/acc,val/acc,lr,step/loss,step/grad_norm';
/** The per-layer grids change only every sampled step and TensorBoard reload: fetched this often. */
const LAYERS_EVERY_MS = 10000;

/** Last error message seen, for the connection banner. */
export let lastError = null;

/**
 * GET a JSON route. Resolves to the parsed body, or null on any failure.
 * @param {string} route e.g. 'runs'
 * @param {Object<string, (string|number)>=} params query parameters
 * @return {Promise<?Object>}
 */
export async function getJson(route, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) query.set(k, String(v));
  const qs = query.toString();
  try {
    const response = await fetch(`./${route}${qs ? '?' + qs : ''}`, {headers: {Accept: 'application/json'}});
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      lastError = (body && body.error) || `${route}: HTTP ${response.status}`;
      return null;
    }
    lastError = null;
    return body;
  } catch (e) {
    lastError = `cannot reach TensorBoard (${e.message})`;
    return null;
  }
}

/**
 * POST a control command. Resolves to {id} or {error} (never null: the page shows why).
 * @param {string} run
 * @param {string} command pause | resume | stop | checkpoint
 * @return {Promise<{id?: string, error?: string}>}
 */
export async function postControl(run, command) {
  try {
    const response = await fetch('./control', {
      method: 'POST',
      headers: {'Content-Type': 'application/json', 'X-TBHealth-Request': '1'},
      body: JSON.stringify({run, command}),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) return {error: body.error || `HTTP ${response.status}`};
    return body;
  } catch (e) {
    return {error: `cannot reach TensorBoard (${e.message})`};
  }
}

/**
 * Poll a control request's acknowledgement until it is done/rejected or `timeoutMs` passes.
 * @return {Promise<{status: string, detail: string, checkpoint?: string}>}
 */
export async function waitForAck(run, id, timeoutMs = 120000, onTick = () => {}) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const ack = await getJson('ack', {run, id});
    if (ack && ack.status !== 'pending') return ack;
    onTick(ack);
    await new Promise((r) => setTimeout(r, 500));
  }
  return {status: 'timeout', detail: `no acknowledgement after ${Math.round(timeoutMs / 1000)} s`};
}

/** URL (relative to the page's base) that downloads one of a run's checkpoints. */
export function checkpointUrl(run, name) {
  return `checkpoint?${new URLSearchParams({run, name}).toString()}`;
}

/** Used until GET config answers: no state counts as live, so controls stay disabled. */
const FALLBACK_CONFIG = {fallback: true, read_only: false, commands: [], metric_keys: [], severities: [],
  states: {live: [], running: [], final: [], all: []}};

/** Server settings and vocabularies (states, metric keys, severities), fetched once.
 * @return {Promise<Config>} */
let configPromise = null;
export function getConfig() {
  if (!configPromise) {
    configPromise = getJson('config').then((c) => {
      if (!c) configPromise = null;  // ask again next time
      return c || FALLBACK_CONFIG;
    });
  }
  return configPromise;
}

/** One run's settings: GET config plus its health settings and `thresholds`; null on failure. */
export function getRunConfig(run) {
  return getJson('config', {run});
}

/**
 * Everything the run page shows for one run, refreshed by `refresh()`. Logs and alerts arrive
 * as deltas (byte offset / cursor); status and scalars are replaced whole.
 */
export class RunModel {
  /** @param {string} run */
  constructor(run) {
    this.run = run;
    /** @type {?Object} */ this.status = null;
    /** @type {?Object} */ this.scalars = null;
    /** @type {Map<string, Alert>} */ this.alerts = new Map();
    /** @type {LogRecord[]} */ this.logs = [];
    /** @type {RunEvent[]} */ this.events = [];
    /** @type {?Object} GET layers' answer */ this.layers = null;
    this.layersAt = -Infinity;
    this.logOffset = 0;
    this.alertCursor = 0;
    this.skippedLogs = 0;
    this.counts = {WARNING: 0, ERROR: 0};
    /** Client clock minus server clock, seconds (for the ETA countdown). */
    this.clockSkew = 0;
    this.closed = false;
    this.ok = true;
  }

  /** Stop accepting responses (the user opened another run). */
  close() { this.closed = true; }

  /**
   * Fetch the latest status, scalars, events and the new logs/alerts in parallel (the layer
   * grids every LAYERS_EVERY_MS, and only while `wantLayers`).
   * @param {boolean} wantLayers
   * @return {Promise<?{newLogs: LogRecord[], changedAlerts: Alert[]}>} null when stale or failed.
   */
  async refresh(wantLayers = true) {
    const run = this.run;
    const layersDue = wantLayers && performance.now() - this.layersAt >= LAYERS_EVERY_MS;
    if (layersDue) this.layersAt = performance.now();
    const [status, scalars, alerts, logs, events, layers] = await Promise.all([
      getJson('status', {run}),
      getJson('scalars', {run, tags: CHART_TAGS}),
      getJson('alerts', {run, after: this.alertCursor}),
      getJson('logs', {run, offset: this.logOffset}),
      getJson('events', {run}),
      layersDue ? getJson('layers', {run}) : null,
    ]);
    if (this.closed) return null;  // a response for a run no longer on screen
    this.ok = status !== null;
    if (status) {
      this.status = status;
      this.clockSkew = Date.now() / 1000 - (status.server_time || Date.now() / 1000);
    }
    if (scalars) this.scalars = scalars;
    if (events) this.setEvents(events.events);
    if (layers) this.layers = layers;
    else if (layersDue) this.layersAt = -Infinity;  // failed: try again next poll
    let changedAlerts = [];
    if (alerts) {
      if (alerts.cursor < this.alertCursor) this.alerts.clear();  // the file was replaced
      this.alertCursor = alerts.cursor;
      changedAlerts = alerts.alerts;
      for (const a of changedAlerts) this.alerts.set(a.id, a);
    }
    let newLogs = [];
    if (logs) {
      if (logs.offset < this.logOffset) this.resetLogs();
      this.logOffset = logs.offset;
      this.skippedLogs += logs.skipped || 0;
      newLogs = logs.records;
      for (const r of newLogs) if (r.level in this.counts) this.counts[r.level] += 1;
      this.logs.push(...newLogs);
      if (this.logs.length > MAX_LOG_RECORDS) this.logs.splice(0, this.logs.length - MAX_LOG_RECORDS);
    }
    return {newLogs, changedAlerts};
  }

  /** Keep the same event objects while the answer is the same: the charts' hover texts are
   * built once per event object (events.js), and hundreds of them cost a redraw's worth. */
  setEvents(events) {
    const json = JSON.stringify(events);
    if (json === this.eventsJson) return;
    this.eventsJson = json;
    this.events = events;
  }

  resetLogs() {
    this.logs = [];
    this.counts = {WARNING: 0, ERROR: 0};
  }

  /** Active (unresolved) alerts, in no particular order (alerts.js groups and sorts them). */
  activeAlerts() {
    return [...this.alerts.values()].filter((a) => !a.resolved);
  }
}

const DISMISSED_KEY = 'tbhealth.dismissedAlerts';

/** Alert ids the user dismissed, kept in localStorage across reloads (per run). */
export function dismissedAlerts(run) {
  try {
    const all = JSON.parse(localStorage.getItem(DISMISSED_KEY) || '{}');
    return new Set(all[run] || []);
  } catch (e) {
    return new Set();
  }
}

export function dismissAlert(run, id) {
  try {
    const all = JSON.parse(localStorage.getItem(DISMISSED_KEY) || '{}');
    const ids = new Set(all[run] || []);
    ids.add(id);
    all[run] = [...ids].slice(-200);
    localStorage.setItem(DISMISSED_KEY, JSON.stringify(all));
  } catch (e) {
    // Storage disabled: the dismissal lasts until the page reloads.
  }
}
