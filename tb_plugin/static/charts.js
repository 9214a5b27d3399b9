// Plotly charts of the run page: loss, accuracy, learning rate (log axis, reductions marked) and
// per-step loss / gradient norm. plotly.js is served by the plugin itself (no CDN: offline
// machines, and the iframe's CSP allows only same-origin scripts).

import {h} from './views.js';

const TRAIN = '#1f77b4';  // blue
const VAL = '#d62728';    // red
const LR = '#9467bd';
const GRAD = '#8c564b';
/** Reduction labels stand at least this share of the x range apart, so they never overlap;
 * every reduction keeps its line, its marker and its hover text. */
const LABEL_SPACING = 1 / 10;
/** Reductions listed under the chart, newest last. */
const MAX_LISTED = 8;

/** Log axes label only 1, 2 and 5 of each decade, in short form (0.002, 5e-5). */
const LOG_AXIS = {type: 'log', dtick: 'D2', tickformat: '~g'};

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

export const CHARTS = [
  {id: 'loss', title: 'Loss'},
  {id: 'acc', title: 'Accuracy'},
  {id: 'lr', title: 'Learning rate'},
  {id: 'steps', title: 'Per-step loss and gradient norm'},
];

/** The chart grid: one card per chart, plus the textual list of LR reductions. */
export function chartsSection() {
  return h('div', {class: 'charts'},
      CHARTS.map((c) => h('div', {class: 'chart-card'},
          h('div', {class: 'chart', testid: `chart-${c.id}`, 'data-chart': c.id},
              h('div', {class: 'chart-placeholder muted', text: 'Loading charts…'})),
          c.id === 'lr' ? h('ul', {class: 'lr-reductions', testid: 'lr-reductions'}) : null)));
}

function xy(series, tag, scale = 1) {
  const s = series[tag];
  if (!s) return {x: [], y: []};
  return {x: s.steps, y: s.values.map((v) => (v === null ? null : v * scale))};
}

function line(data, name, color, extra = {}) {
  return {type: 'scatter', mode: 'lines+markers', name, x: data.x, y: data.y, line: {color, width: 2},
    marker: {size: 4}, connectgaps: false, ...extra};
}

function baseLayout(theme, title, xTitle, uirevision) {
  return {
    title: {text: title, font: {size: 13}, x: 0.02, xanchor: 'left'},
    height: 270,
    margin: {l: 56, r: 20, t: 36, b: 40},
    paper_bgcolor: 'rgba(0,0,0,0)',
    plot_bgcolor: 'rgba(0,0,0,0)',
    font: {color: theme.fg, size: 11},
    xaxis: {title: {text: xTitle}, gridcolor: theme.grid, zerolinecolor: theme.grid},
    yaxis: {gridcolor: theme.grid, zerolinecolor: theme.grid},
    legend: {orientation: 'h', x: 1, xanchor: 'right', y: 1.15},
    hovermode: 'x unified',
    uirevision,  // keeps the user's zoom and pan across updates
  };
}

/** The reductions to label: the first, then each one far enough from the last labelled. */
export function spacedOut(reductions, steps) {
  const span = steps.length ? Math.max(1, steps[steps.length - 1] - steps[0]) : 1;
  const out = [];
  for (const r of reductions) {
    if (!out.length || r.epoch - out[out.length - 1].epoch >= span * LABEL_SPACING) out.push(r);
  }
  return out;
}

function emptyNote(layout, text) {
  layout.annotations = [{text, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5, showarrow: false,
    font: {color: layout.font.color}}];
  layout.xaxis.visible = false;
  layout.yaxis.visible = false;
}

/** Plotly figure for one chart id, from the `scalars` route's answer. Pure. */
export function figure(id, scalars, theme, uirevision) {
  const series = (scalars && scalars.series) || {};
  let traces = [];
  let layout;
  if (id === 'loss' || id === 'acc') {
    const scale = id === 'acc' ? 100 : 1;
    layout = baseLayout(theme, id === 'loss' ? 'Loss' : 'Accuracy (%)', 'epoch', uirevision);
    traces = [line(xy(series, `train/${id}`, scale), 'train', TRAIN), line(xy(series, `val/${id}`, scale), 'val', VAL)];
  } else if (id === 'lr') {
    layout = baseLayout(theme, 'Learning rate', 'epoch', uirevision);
    Object.assign(layout.yaxis, LOG_AXIS);
    const reductions = (scalars && scalars.lr_reductions) || [];
    traces = [line(xy(series, 'lr'), 'lr', LR, {line: {color: LR, width: 2, shape: 'hv'}})];
    if (reductions.length) {
      traces.push({type: 'scatter', mode: 'markers', name: 'LR reduced', x: reductions.map((r) => r.epoch),
        y: reductions.map((r) => r.to), text: reductions.map((r) => r.label), hoverinfo: 'text',
        marker: {symbol: 'triangle-down', size: 11, color: VAL}});
    }
    layout.shapes = reductions.map((r) => ({type: 'line', xref: 'x', yref: 'paper', x0: r.epoch, x1: r.epoch,
      y0: 0, y1: 1, line: {color: theme.muted, width: 1, dash: 'dash'}}));
    // Labels run up along their line (vertical text); close neighbours are thinned out.
    layout.annotations = spacedOut(reductions, series.lr ? series.lr.steps : []).map((r) => ({x: r.epoch,
      xref: 'x', yref: 'paper', y: 0.02, yanchor: 'bottom', xanchor: 'right', xshift: -2, textangle: -90,
      text: r.label, showarrow: false, font: {size: 10, color: theme.muted}}));
  } else {
    layout = baseLayout(theme, 'Per-step loss and gradient norm', 'global step', uirevision);
    // Dense per-step series read best as plain lines; a handful of points needs its markers.
    const mode = (series['step/loss'] || {steps: []}).steps.length > 40 ? 'lines' : 'lines+markers';
    traces = [line(xy(series, 'step/loss'), 'step loss', TRAIN, {mode})];
    if (series['step/grad_norm']) {
      traces.push(line(xy(series, 'step/grad_norm'), 'grad norm', GRAD, {mode, yaxis: 'y2'}));
      layout.yaxis2 = {overlaying: 'y', side: 'right', showgrid: false, title: {text: 'grad norm'}, ...LOG_AXIS};
      layout.margin.r = 56;
    }
  }
  if (traces.every((t) => !t.x.length)) {
    emptyNote(layout, 'No data yet');
  }
  return {traces, layout};
}

/** A cheap fingerprint of what a chart shows, so an unchanged chart is not redrawn. */
function signature(fig, theme) {
  return JSON.stringify([theme.fg, fig.traces.map((t) => [t.x.length, t.x[t.x.length - 1], t.y[t.y.length - 1]]),
    (fig.layout.shapes || []).length]);
}

/**
 * Draw or update every chart in `container` (Plotly.react updates in place).
 * @return {Promise<void>}
 */
export async function updateCharts(container, scalars, theme, uirevision) {
  let Plotly;
  try {
    Plotly = await loadPlotly();
  } catch (e) {
    for (const el of container.querySelectorAll('.chart')) el.textContent = `Charts unavailable: ${e.message}`;
    return;
  }
  for (const el of container.querySelectorAll('.chart')) {
    const fig = figure(el.dataset.chart, scalars, theme, uirevision);
    const sig = signature(fig, theme);
    if (el.dataset.signature === sig) continue;
    el.dataset.signature = sig;
    const placeholder = el.querySelector('.chart-placeholder');
    if (placeholder) placeholder.remove();
    await Plotly.react(el, fig.traces, fig.layout,
        {responsive: true, displaylogo: false, modeBarButtonsToRemove: ['lasso2d', 'select2d']});
  }
  const list = container.querySelector('[data-testid="lr-reductions"]');
  if (list) {
    const all = ((scalars && scalars.lr_reductions) || []).map((r) => r.label);
    const labels = all.slice(-MAX_LISTED);
    if (list.dataset.labels !== all.join('|')) {
      list.dataset.labels = all.join('|');
      const earlier = all.length - labels.length;
      list.replaceChildren(...(earlier ? [h('li', {class: 'muted', text: `${earlier} earlier reduction${earlier === 1 ? '' : 's'}…`})] : []),
          ...labels.map((t) => h('li', {testid: 'lr-reduction', text: t})));
    }
  }
}
