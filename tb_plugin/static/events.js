// What happened and when, drawn on the charts: alerts (fired, resolved), control actions and LR
// changes from GET events. Pure figure builders, plus the toggles that choose which kinds show.
//
// On a chart the events sit in a strip of three lanes above the plot (never on top of the
// curves); events close together in one lane merge into one marker whose hover lists them, so
// hundreds of events stay readable. The timeline shows the same events in one lane per alert
// rule (an episode is a bar from firing to resolution), one for control actions and one for LR.

import {h, setText, fmtClock, fmtSig} from './views.js';
import {baseLayout, integerAxis, escapeHtml} from './plotting.js';

/** Each kind's toggle label and lane in the chart strip (0 = lowest). */
export const KINDS = {
  alert: {label: 'Alerts', lane: 2},
  control: {label: 'Control actions', lane: 1},
  lr: {label: 'LR changes', lane: 0},
};
const SEVERITY_COLOR = {critical: '#d62728', warning: '#e3a008', info: '#1a73e8'};
const RESOLVED_COLOR = '#1e8e3e';
const COMMAND_COLOR = {pause: '#e3a008', resume: '#1e8e3e', stop: '#d62728', checkpoint: '#1a73e8'};
const LR_COLOR = '#9467bd';
const MUTED_COLOR = '#9aa0a6';
/** A lane of a chart holds at most this many markers; closer events merge. */
const BUCKETS = 240;
/** Lines of event text in one merged marker's hover before "+N more". */
const HOVER_LINES = 6;
/** The strip's share of a chart's height, above the plot. */
const STRIP = [0.86, 1];

// ------------------------------------------------------------------------------ text and colour

/** Texts already built, per event object (the page keeps the objects while GET events answers the same). */
const texts = new WeakMap();

/** One line (HTML-escaped, for Plotly's hover) saying what an event was. */
export function eventText(e) {
  let text = texts.get(e);
  if (text === undefined) {
    text = describe(e);
    texts.set(e, text);
  }
  return text;
}

function describe(e) {
  const where = [e.epoch != null ? `epoch ${e.epoch}` : null, e.step != null ? `step ${e.step}` : null,
    e.time ? fmtClock(e.time) : null].filter(Boolean).join(' · ');
  let what;
  if (e.kind === 'alert') {
    const layers = Array.isArray(e.layers) && e.layers.length > 1 ? ` +${e.layers.length - 1} layers` : '';
    const on = [e.layer ? `${e.layer}${layers}` : null, e.rank != null ? `rank ${e.rank}` : null].filter(Boolean).join(', ');
    what = `${e.resolved ? '✓ resolved' : `⚠ ${String(e.severity || '').toUpperCase()}`} ${e.rule}${on ? ` (${on})` : ''}`;
  } else if (e.kind === 'control') {
    what = `${e.command} ${e.status}${e.source ? ` (from ${e.source})` : ''}${e.detail ? `: ${e.detail}` : ''}`;
  } else if (e.kind === 'lr') {
    what = `LR ${fmtSig(e.from)} → ${fmtSig(e.to)} (×${fmtSig(e.to / e.from, 2)}) from epoch ${e.epoch}`;
  } else {
    what = String(e.kind);
  }
  return `${escapeHtml(what)}${where ? ` <span style="opacity:.7">${escapeHtml(where)}</span>` : ''}`;
}

/** Marker colour of one event. */
export function eventColor(e) {
  if (e.kind === 'alert') return e.resolved ? RESOLVED_COLOR : SEVERITY_COLOR[e.severity] || MUTED_COLOR;
  if (e.kind === 'control') return e.status === 'done' ? COMMAND_COLOR[e.command] || MUTED_COLOR : MUTED_COLOR;
  return LR_COLOR;
}

function eventSymbol(e) {
  if (e.kind === 'alert') return e.resolved ? 'circle-open' : 'triangle-down';
  if (e.kind === 'control') return 'square';
  return e.to < e.from ? 'triangle-down-open' : 'triangle-up-open';
}

/** The id an event is highlighted by: its alert's or request's id. */
function eventId(e) {
  return e.kind === 'lr' ? `lr-${e.epoch}` : e.id;
}

// ------------------------------------------------------------------------------ chart overlay

/**
 * Events of the visible kinds with a position on the axis (`key` 'epoch_x' or 'step'), merged per
 * lane (`laneOf`, the kind by default) into at most BUCKETS markers over the axis' span. Pure.
 * @return {{lane: string, x: number, events: Object[]}[]}
 */
export function bucketEvents(events, key, kinds, laneOf = (e) => e.kind) {
  const placed = events.filter((e) => kinds.has(e.kind) && typeof e[key] === 'number');
  if (!placed.length) return [];
  const xs = placed.map((e) => e[key]);
  const lo = Math.min(...xs);
  const width = (Math.max(...xs) - lo) / BUCKETS || 1;
  const buckets = new Map();
  for (const e of placed) {
    const lane = laneOf(e);
    const id = `${lane}:${Math.floor((e[key] - lo) / width)}`;
    if (!buckets.has(id)) buckets.set(id, {lane, x: e[key], events: []});
    buckets.get(id).events.push(e);
  }
  return [...buckets.values()];
}

function mergedText(events) {
  const lines = events.slice(0, HOVER_LINES).map(eventText);
  if (events.length > HOVER_LINES) lines.push(`+${events.length - HOVER_LINES} more`);
  return (events.length > 1 ? `<b>${events.length} events</b><br>` : '') + lines.join('<br>');
}

/** The most telling event of a merged marker: an open critical alert before anything else. */
function leader(events) {
  const rank = (e) => (e.kind === 'alert' && !e.resolved ? (e.severity === 'critical' ? 0 : 1) : 2);
  return events.reduce((best, e) => (rank(e) < rank(best) ? e : best), events[0]);
}

/**
 * Add the event strip to a chart's figure in place: marker traces on a y axis of their own above
 * the plot, and a vertical line at the highlighted event. `key`: the x of this chart's axis.
 */
export function addOverlay(fig, events, key, kinds, highlight) {
  const buckets = bucketEvents(events, key, kinds);
  const shapes = highlightShapes(events, key, highlight);
  if (!buckets.length && !shapes.length) return fig;
  fig.layout.yaxis.domain = [0, STRIP[0] - 0.03];
  fig.layout.yaxis5 = {domain: STRIP, range: [-0.5, 2.5], visible: false, fixedrange: true};
  for (const kind of Object.keys(KINDS)) {
    const mine = buckets.filter((b) => b.lane === kind);
    if (mine.length) fig.traces.push(markerTrace(mine, () => KINDS[kind].lane, {yaxis: 'y5', name: KINDS[kind].label, cliponaxis: false}));
  }
  fig.layout.shapes = [...(fig.layout.shapes || []), ...shapes];
  return fig;
}

/** One scatter trace of merged markers, each drawn like its most telling event, at height `y(bucket)`. */
function markerTrace(buckets, y, extra) {
  const leaders = buckets.map((b) => leader(b.events));
  return {type: 'scatter', mode: 'markers', showlegend: false, x: buckets.map((b) => b.x), y: buckets.map(y),
    text: buckets.map((b) => mergedText(b.events)), customdata: leaders.map(eventId), hovertemplate: '%{text}<extra></extra>',
    marker: {size: buckets.map((b) => (b.events.length > 1 ? 11 : 9)), color: leaders.map(eventColor),
      symbol: leaders.map(eventSymbol), line: {width: 1.5, color: leaders.map(eventColor)}}, ...extra};
}

/** A dashed vertical line through the whole chart at the highlighted event(s). */
export function highlightShapes(events, key, highlight) {
  if (!highlight) return [];
  return events.filter((e) => eventId(e) === highlight && typeof e[key] === 'number' && !(e.kind === 'alert' && e.resolved))
      .map((e) => ({type: 'line', xref: 'x', yref: 'paper', x0: e[key], x1: e[key], y0: 0, y1: 1,
        line: {color: eventColor(e), width: 2, dash: 'dot'}}));
}

// ------------------------------------------------------------------------------ timeline

/** Lane names: one per alert rule (most severe rules first), then control, then LR. */
function lanes(events) {
  const rules = new Map();
  for (const e of events) if (e.kind === 'alert') rules.set(e.rule, Math.min(rules.get(e.rule) ?? 9, e.severity === 'critical' ? 0 : 1));
  const alertLanes = [...rules.entries()].sort((a, b) => a[1] - b[1] || a[0].localeCompare(b[0])).map(([r]) => `⚠ ${r}`);
  const rest = ['control', 'lr'].filter((k) => events.some((e) => e.kind === k)).map((k) => KINDS[k].label);
  return [...alertLanes, ...rest];
}

function laneOf(e) {
  return e.kind === 'alert' ? `⚠ ${e.rule}` : KINDS[e.kind].label;
}

/** Bars from each alert's firing to its resolution (to `xEnd` while still open), one trace per severity. */
function episodeTraces(events, xEnd) {
  const open = new Map();
  const bars = {};
  for (const e of events) {
    if (e.kind !== 'alert' || typeof e.epoch_x !== 'number') continue;
    if (!e.resolved) open.set(e.id, e);
    else if (open.has(e.id)) { (bars[open.get(e.id).severity] ||= []).push([open.get(e.id), e.epoch_x]); open.delete(e.id); }
  }
  for (const e of open.values()) (bars[e.severity] ||= []).push([e, Math.max(xEnd ?? e.epoch_x, e.epoch_x)]);
  return Object.entries(bars).map(([severity, list]) => ({type: 'scatter', mode: 'lines', hoverinfo: 'skip', showlegend: false,
    x: list.flatMap(([e, x1]) => [e.epoch_x, x1, null]), y: list.flatMap(([e]) => [laneOf(e), laneOf(e), null]),
    line: {color: SEVERITY_COLOR[severity] || MUTED_COLOR, width: 5}, opacity: 0.35}));
}

/**
 * The timeline figure: every visible event on the epoch axis, one lane per alert rule, control
 * and LR. `xEnd` is where the run is now (open alert bars reach it). Pure.
 */
export function timelineFigure(events, kinds, theme, highlight, uirevision, xEnd) {
  const shown = events.filter((e) => kinds.has(e.kind) && typeof e.epoch_x === 'number');
  const names = lanes(shown);
  const layout = baseLayout(theme, 'Timeline', 'epoch', uirevision, 64 + 26 * Math.max(names.length, 1));
  layout.margin = {l: 150, r: 20, t: 30, b: 36};
  layout.hovermode = 'closest';
  layout.yaxis = {type: 'category', categoryorder: 'array', categoryarray: [...names].reverse(), gridcolor: theme.grid,
    fixedrange: true, automargin: true};
  const right = Math.ceil(Math.max(xEnd ?? 0, ...shown.map((e) => e.epoch_x), 1));
  Object.assign(layout.xaxis, {range: [0, right + 0.05 * right]}, integerAxis(right));
  layout.shapes = highlightShapes(shown, 'epoch_x', highlight);
  const traces = episodeTraces(shown, xEnd);
  traces.push(markerTrace(bucketEvents(shown, 'epoch_x', kinds, laneOf), (b) => b.lane, {}));
  if (!shown.length) {
    layout.annotations = [{text: events.length ? 'All event kinds are switched off' : 'No events yet', xref: 'paper', yref: 'paper',
      x: 0.5, y: 0.5, showarrow: false, font: {color: theme.muted}}];
  }
  return {traces, layout};
}

// ------------------------------------------------------------------------------ toggles

/**
 * Checkboxes choosing which kinds of event the charts and the timeline show.
 * @param {Set<string>} kinds the visible kinds, changed in place
 * @param {function()} onChange called after a change
 */
export function eventToggles(kinds, onChange) {
  const boxes = Object.entries(KINDS).map(([kind, {label}]) => {
    const count = h('span', {class: 'muted', testid: `events-count-${kind}`});
    const input = h('input', {type: 'checkbox', testid: `toggle-${kind}`, checked: kinds.has(kind), onChange: (e) => {
      if (e.target.checked) kinds.add(kind);
      else kinds.delete(kind);
      onChange();
    }});
    return h('label', {class: `event-toggle kind-${kind}`}, input, ` ${label} `, count);
  });
  return h('div', {class: 'event-toggles', testid: 'event-toggles'}, h('span', {class: 'muted', text: 'Show on charts:'}), boxes);
}

/** Update the counts next to the toggles. */
export function setEventCounts(el, events) {
  for (const kind of Object.keys(KINDS)) {
    const n = events.filter((e) => e.kind === kind).length;
    setText(el.querySelector(`[data-testid="events-count-${kind}"]`), `(${n})`);
  }
}
