// The per-layer health view: a heatmap (layer × step) of one per-layer metric from GET layers,
// layers in model order, first layer on top. Dark means unhealthy in every metric (a tiny
// gradient norm, a large dead or zero fraction), so where a vanishing or dying layer starts
// shows at a glance; layers named by an open alert are outlined and marked ⚠.

import {h, setText, fmtSig, fmtPct} from './views.js';
import {plotlyOrNote, baseLayout, emptyNote, draw} from './plotting.js';

/** The metrics of GET layers, in the order offered; `threshold` names its entry of GET config's thresholds. */
export const METRICS = {
  grad_norm: {label: 'Gradient norm', log: true, threshold: 'vanishing_grad_norm', below: 'vanishing below'},
  dead_units: {label: 'Dead units', log: false, threshold: 'dead_fraction', below: 'dead above'},
  zero_activations: {label: 'Zero activations', log: false, threshold: null, below: ''},
};
const ROW_PX = 18;

/** log10 of a positive value; zero (a gradient that is exactly 0) sits at `floor`. */
function log10(v, floor) {
  if (typeof v !== 'number' || !Number.isFinite(v)) return null;
  return v > 0 ? Math.log10(v) : floor;
}

/** Colour-bar ticks at whole decades between `lo` and `hi`, labelled 1e-7 rather than -7. */
function decadeTicks(lo, hi) {
  const step = Math.max(1, Math.ceil((hi - lo) / 8));
  const vals = [];
  for (let d = Math.ceil(lo); d <= Math.floor(hi); d += step) vals.push(d);
  return {tickvals: vals, ticktext: vals.map((d) => `1e${d}`)};
}

/**
 * The heatmap figure of one metric's grid ({layers, steps, values}). `flagged`: layer names of
 * open alerts; `threshold`: the run's threshold for this metric (or null). Pure.
 */
export function heatmapFigure(grid, metric, theme, flagged, threshold, uirevision) {
  const spec = METRICS[metric];
  const layers = grid ? grid.layers : [];
  const title = `${spec.label}${spec.log ? ' (log scale)' : ''}${threshold != null && spec.below ? ` — ${spec.below} ${fmtSig(threshold)}` : ''}`;
  const layout = baseLayout(theme, title, 'global step', uirevision, Math.min(1200, 110 + ROW_PX * Math.max(layers.length, 6)));
  layout.hovermode = 'closest';
  layout.margin.l = 110;
  if (!layers.length) {
    emptyNote(layout, 'No per-layer readings yet: they come every health.every_steps steps');
    return {traces: [], layout};
  }
  const finite = grid.values.flat().filter((v) => typeof v === 'number' && v > 0);
  const lo = spec.log && finite.length ? Math.floor(Math.log10(Math.min(...finite))) : 0;
  const hi = spec.log && finite.length ? Math.ceil(Math.log10(Math.max(...finite))) : 1;
  const z = grid.values.map((row) => row.map((v) => (spec.log ? log10(v, lo) : v)));
  const text = grid.values.map((row) => row.map((v) => (spec.log ? fmtSig(v, 4) : fmtPct(v, 2))));
  const trace = {type: 'heatmap', x: grid.steps, y: layers, z, text, hoverongaps: false,
    hovertemplate: `%{y} · step %{x}<br>${spec.label.toLowerCase()} %{text}<extra></extra>`,
    colorscale: 'Viridis', reversescale: !spec.log, zmin: lo, zmax: spec.log ? Math.max(hi, lo + 1) : 1,
    colorbar: {thickness: 12, outlinewidth: 0, ...(spec.log ? decadeTicks(lo, hi) : {tickformat: '.0%'})}};
  layout.yaxis = {type: 'category', autorange: 'reversed', tickvals: layers, gridcolor: theme.grid,
    ticktext: layers.map((l) => (flagged.has(l) ? `<b>⚠ ${l}</b>` : l)), automargin: true};
  layout.shapes = layers.map((l, i) => [l, i]).filter(([l]) => flagged.has(l)).map(([, i]) => ({type: 'rect', xref: 'paper',
    x0: 0, x1: 1, yref: 'y', y0: i - 0.5, y1: i + 0.5, line: {color: '#d62728', width: 2}}));
  return {traces: [trace], layout};
}

export class LayersView {
  constructor() {
    this.metric = 'grad_norm';
    this.tabs = Object.entries(METRICS).map(([m, {label}]) => h('button', {class: 'tab', testid: `layers-metric-${m}`, text: label,
      'data-metric': m, onClick: () => { this.metric = m; if (this.last) this.update(...this.last); }}));
    this.chart = h('div', {class: 'chart', testid: 'chart-layers', 'data-chart': 'layers'},
        h('div', {class: 'chart-placeholder muted', text: 'Loading per-layer readings…'}));
    this.note = h('div', {class: 'muted small', testid: 'layers-note'});
    this.el = h('div', {class: 'layers-view'}, h('div', {class: 'tabs', role: 'tablist'}, this.tabs), this.chart, this.note);
  }

  /**
   * @param {?Object} data GET layers' answer
   * @param {Set<string>} flagged layers named by open alerts
   * @param {Object} thresholds GET config?run= thresholds (may be empty)
   */
  async update(data, flagged, thresholds, theme, uirevision) {
    this.last = [data, flagged, thresholds, theme, uirevision];
    const metrics = (data && data.metrics) || {};
    for (const t of this.tabs) {
      t.classList.toggle('active', t.dataset.metric === this.metric);
      t.disabled = !metrics[t.dataset.metric];
    }
    if (!metrics[this.metric] && Object.keys(metrics).length) this.metric = Object.keys(metrics)[0];
    const grid = metrics[this.metric] || null;
    const spec = METRICS[this.metric];
    const fig = heatmapFigure(grid, this.metric, theme, flagged, spec.threshold ? thresholds[spec.threshold] ?? null : null, uirevision);
    this.chart.dataset.metric = this.metric;
    this.chart.dataset.rows = grid ? grid.layers.join('|') : '';
    this.chart.dataset.flagged = [...flagged].filter((l) => grid && grid.layers.includes(l)).join('|');
    const order = data && data.order === 'model' ? 'model order' : 'name order (the run did not record its model order)';
    setText(this.note, grid ? `${grid.layers.length} layers in ${order}, first layer on top; ${grid.steps.length} sampled steps`
        + (data.omitted_layers ? `; ${data.omitted_layers} more layers not shown` : '') : '');
    const Plotly = await plotlyOrNote([this.chart]);
    if (Plotly) await draw(Plotly, this.chart, fig, [theme.fg, this.metric, this.chart.dataset.flagged, grid ? grid.values.length : 0]);
  }
}
