// Plotly plumbing shared by every chart of the tab: loading plotly.js, the common layout, axes
// that stay readable at any length, and drawing only what changed. plotly.js is served by the
// plugin itself (no CDN: offline machines, and the iframe's CSP allows only same-origin scripts).

/** Plotly options for every chart: no logo, no selection tools (nothing here uses a selection). */
export const PLOT_CONFIG = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ['lasso2d', 'select2d']};
/** An axis spanning at most this many units gets a tick at every integer (epochs 1, 2, 3). */
const INTEGER_TICKS_UP_TO = 12;
/** A log axis labels at most about this many decades; wider ranges label every n-th decade. */
const LOG_LABELS = 6;

let plotlyPromise = null;

/** Load plotly.min.js once, as a classic script (it defines window.Plotly). */
export function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyPromise) {
    plotlyPromise = new Promise((resolve, reject) => {
      const s = document.createElement('script');
      s.src = 'plotly.min.js';
      s.onload = () => resolve(window.Plotly);
      s.onerror = () => { plotlyPromise = null; reject(new Error('could not load plotly.min.js')); };
      document.head.append(s);
    });
  }
  return plotlyPromise;
}

/**
 * plotly.js, or null after writing why the charts are missing into each of `elements`.
 * @param {Iterable<HTMLElement>} elements
 */
export async function plotlyOrNote(elements) {
  try {
    return await loadPlotly();
  } catch (e) {
    for (const el of elements) el.textContent = `Charts unavailable: ${e.message}`;
    return null;
  }
}

/** `{x, y}` of one series from the scalars route, values multiplied by `scale` (null stays a gap). */
export function xy(series, tag, scale = 1) {
  const s = series[tag];
  if (!s) return {x: [], y: []};
  return {x: s.steps, y: s.values.map((v) => (v === null ? null : v * scale))};
}

export function line(data, name, color, extra = {}) {
  return {type: 'scatter', mode: 'lines+markers', name, x: data.x, y: data.y, line: {color, width: 2},
    marker: {size: 4}, connectgaps: false, ...extra};
}

/** The layout every chart starts from; `uirevision` keeps the user's zoom and pan across updates. */
export function baseLayout(theme, title, xTitle, uirevision, height = 270) {
  return {
    title: {text: title, font: {size: 13}, x: 0.02, xanchor: 'left'},
    height,
    margin: {l: 60, r: 20, t: 36, b: 40},
    paper_bgcolor: 'rgba(0,0,0,0)',
    plot_bgcolor: 'rgba(0,0,0,0)',
    font: {color: theme.fg, size: 11},
    xaxis: {title: {text: xTitle}, gridcolor: theme.grid, zerolinecolor: theme.grid},
    yaxis: {gridcolor: theme.grid, zerolinecolor: theme.grid},
    legend: {orientation: 'h', x: 1, xanchor: 'right', y: 1.15},
    hovermode: 'x unified',
    uirevision,
  };
}

/**
 * Tick settings for an axis of whole numbers (epochs, steps) reaching `maxX`: a tick at every
 * integer on short ranges (1, 2, 3 rather than 1, 1.5, 2, 2.5, 3) or before there is any data;
 * Plotly's own choice on longer ones (whole numbers unless the user zooms in).
 */
export function integerAxis(maxX) {
  if (typeof maxX !== 'number' || !Number.isFinite(maxX) || maxX <= INTEGER_TICKS_UP_TO) {
    return {tickmode: 'linear', tick0: 0, dtick: 1};
  }
  return {};
}

/** The largest finite number among several arrays (null when none). */
export function maxOf(...arrays) {
  let m = null;
  for (const a of arrays) for (const v of a || []) if (typeof v === 'number' && Number.isFinite(v) && (m === null || v > m)) m = v;
  return m;
}

/**
 * A log axis for positive `values` with labels that never pile up: 1-2-5 labels over a few
 * decades, every decade (or every n-th) over many, short number formats (0.002, 1e-19).
 */
export function logAxis(values) {
  const positive = values.filter((v) => typeof v === 'number' && Number.isFinite(v) && v > 0);
  const axis = {type: 'log', tickformat: '.3~g', exponentformat: 'e'};
  if (!positive.length) return axis;
  const decades = Math.log10(Math.max(...positive) / Math.min(...positive));
  if (decades > 3) axis.dtick = Math.ceil(decades / LOG_LABELS);
  else if (decades > 0.5) axis.dtick = 'D2';
  return axis;
}

/** Replace a chart's content with a centred note (no data yet). */
export function emptyNote(layout, text) {
  layout.annotations = [{text, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5, showarrow: false,
    font: {color: layout.font.color}}];
  layout.xaxis.visible = false;
  layout.yaxis.visible = false;
}

/** A cheap fingerprint of what a chart shows, so an unchanged chart is not redrawn. */
function signature(fig, extra) {
  return JSON.stringify([extra, fig.traces.map((t) => [t.x.length, t.x[t.x.length - 1], t.y[t.y.length - 1], t.visible]),
    (fig.layout.shapes || []).length, fig.layout.height]);
}

/**
 * Draw `fig` ({traces, layout}) into `el` unless it shows the same as last time.
 * `extra` is anything else the picture depends on (theme, toggles, highlight).
 * @return {Promise<boolean>} whether it was drawn
 */
export async function draw(Plotly, el, fig, extra) {
  const sig = signature(fig, extra);
  if (el.dataset.signature === sig) return false;
  el.dataset.signature = sig;
  const placeholder = el.querySelector('.chart-placeholder');
  if (placeholder) placeholder.remove();
  await Plotly.react(el, fig.traces, fig.layout, PLOT_CONFIG);
  return true;
}

/** Plotly renders hover text as a little HTML: text from files must not be markup. */
export function escapeHtml(text) {
  return String(text ?? '').replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}
