// The run page's curves: loss, accuracy, learning rate (log axis, changes marked) and per-step
// loss / gradient norm, with the run's events on them, plus the events timeline and the list of
// LR changes. Figures are pure functions of the routes' answers; updateCharts draws them.

import {h, setText} from './views.js';
import {plotlyOrNote, xy, line, baseLayout, integerAxis, logAxis, maxOf, emptyNote, draw} from './plotting.js';
import {addOverlay, timelineFigure, eventToggles, setEventCounts} from './events.js';

const TRAIN = '#1f77b4';  // blue
const VAL = '#d62728';    // red
const LR = '#9467bd';
const GRAD = '#8c564b';

/** Which x each chart has: epochs (events placed by `epoch_x`) or global steps (by `step`). */
export const CHARTS = [
  {id: 'loss', title: 'Loss', x: 'epoch_x', events: true},
  {id: 'acc', title: 'Accuracy', x: 'epoch_x', events: true},
  {id: 'lr', title: 'Learning rate', x: 'epoch_x', events: false},
  {id: 'steps', title: 'Per-step loss and gradient norm', x: 'step', events: true},
];

/**
 * What the charts draw besides the series: the run's events, which kinds show, and the id of
 * the event picked from an alert's "show on chart" link or a click on the timeline.
 * @typedef {{events: Object[], kinds: Set<string>, highlight: ?string}} Overlay
 */

/**
 * The curves section: event toggles, the chart grid, the timeline, the list of LR changes.
 * @param {Overlay} overlay changed in place by the toggles
 * @param {function()} onToggle redraw after a toggle
 */
export function chartsSection(overlay, onToggle) {
  const lrList = h('details', {class: 'lr-changes', testid: 'lr-changes'},
      h('summary', {testid: 'lr-changes-summary'}), h('ul', {class: 'lr-reductions', testid: 'lr-reductions'}));
  return h('div', {class: 'charts-wrap'},
      eventToggles(overlay.kinds, onToggle),
      h('div', {class: 'charts'},
          CHARTS.map((c) => h('div', {class: 'chart-card'},
              h('div', {class: 'chart', testid: `chart-${c.id}`, 'data-chart': c.id},
                  h('div', {class: 'chart-placeholder muted', text: 'Loading charts…'})),
              c.id === 'lr' ? lrList : null))),
      h('div', {class: 'chart-card timeline-card'},
          h('div', {class: 'chart timeline', testid: 'chart-timeline', 'data-chart': 'timeline'})));
}

/** Plotly figure for one chart id, from the `scalars` route's answer (events added by `addOverlay`). Pure. */
export function figure(id, scalars, theme, uirevision) {
  const series = (scalars && scalars.series) || {};
  let traces = [];
  let layout;
  if (id === 'loss' || id === 'acc') {
    const scale = id === 'acc' ? 100 : 1;
    layout = baseLayout(theme, id === 'loss' ? 'Loss' : 'Accuracy (%)', 'epoch', uirevision);
    traces = [line(xy(series, `train/${id}`, scale), 'train', TRAIN), line(xy(series, `val/${id}`, scale), 'val', VAL)];
    Object.assign(layout.xaxis, integerAxis(maxOf(...traces.map((t) => t.x))));
  } else if (id === 'lr') {
    layout = lrLayout(theme, uirevision, series.lr, scalars);
    traces = lrTraces(series.lr, (scalars && scalars.lr_reductions) || []);
  } else {
    layout = baseLayout(theme, 'Per-step loss and gradient norm', 'global step', uirevision);
    // Dense per-step series read best as plain lines; a handful of points needs its markers.
    const mode = (series['step/loss'] || {steps: []}).steps.length > 40 ? 'lines' : 'lines+markers';
    traces = [line(xy(series, 'step/loss'), 'step loss', TRAIN, {mode})];
    if (series['step/grad_norm']) {
      const grad = xy(series, 'step/grad_norm');
      traces.push(line(grad, 'grad norm', GRAD, {mode, yaxis: 'y2'}));
      layout.yaxis2 = {overlaying: 'y', side: 'right', showgrid: false, title: {text: 'grad norm'}, ...logAxis(grad.y)};
      layout.margin.r = 60;
    }
    Object.assign(layout.xaxis, integerAxis(maxOf(traces[0].x)));
  }
  if (traces.every((t) => !t.x.length)) emptyNote(layout, 'No data yet');
  return {traces, layout};
}

function lrLayout(theme, uirevision, lr, scalars) {
  const layout = baseLayout(theme, 'Learning rate', 'epoch', uirevision);
  Object.assign(layout.yaxis, logAxis(lr ? lr.values : []));
  Object.assign(layout.xaxis, integerAxis(maxOf(lr ? lr.steps : [])));
  layout.hovermode = 'closest';
  return layout;
}

/**
 * The LR as a staircase over each epoch's span (epoch k spans (k-1, k], as the events do: a
 * change shows at the boundary where it took effect), each reduction a small marker there whose
 * hover says what changed: no text on the chart, however many there are.
 */
function lrTraces(lr, reductions) {
  const steps = lr ? lr.steps : [];
  const values = lr ? lr.values : [];
  const stairs = {x: steps.length ? [steps[0] - 1, ...steps] : [], y: values.length ? [values[0], ...values] : []};
  const traces = [line(stairs, 'lr', LR, {line: {color: LR, width: 2, shape: 'vh'}, marker: {size: 4},
    text: stairs.x.map((x, i) => `epoch ${i ? x : x + 1}`), hovertemplate: '%{text}: LR %{y:.3~g}<extra></extra>'})];
  if (reductions.length) {
    traces.push({type: 'scatter', mode: 'markers', name: 'LR reduced', x: reductions.map((r) => r.epoch - 1),
      y: reductions.map((r) => r.to), text: reductions.map((r) => r.label), hovertemplate: '%{text}<extra></extra>',
      marker: {symbol: 'triangle-down', size: 9, color: VAL}});
  }
  return traces;
}

/** The list of LR changes under the LR chart: collapsed, its summary counts them. */
function updateLrList(container, scalars) {
  const details = container.querySelector('[data-testid="lr-changes"]');
  const all = ((scalars && scalars.lr_reductions) || []).map((r) => r.label);
  details.hidden = !all.length;
  const list = details.querySelector('ul');
  if (list.dataset.labels === all.join('|')) return;
  list.dataset.labels = all.join('|');
  setText(details.querySelector('summary'), `${all.length} LR reduction${all.length === 1 ? '' : 's'}`);
  list.replaceChildren(...all.map((t) => h('li', {testid: 'lr-reduction', text: t})));
}

/**
 * Draw or update every chart in `container` (Plotly.react updates in place) and the timeline.
 * `onPick(id)` is called with the event a user clicks in the timeline or on a chart's strip.
 * @param {Overlay} overlay
 * @return {Promise<void>}
 */
export async function updateCharts(container, scalars, theme, uirevision, overlay, onPick) {
  const Plotly = await plotlyOrNote(container.querySelectorAll('.chart'));
  if (!Plotly) return;
  const extra = [theme.fg, overlay.events.length, [...overlay.kinds].sort().join(), overlay.highlight];
  const epochs = maxOf(scalars && scalars.series['train/loss'] ? scalars.series['train/loss'].steps : []);
  for (const c of CHARTS) {
    const el = container.querySelector(`[data-chart="${c.id}"]`);
    const fig = figure(c.id, scalars, theme, uirevision);
    if (c.events) addOverlay(fig, overlay.events, c.x, overlay.kinds, overlay.highlight);
    if (await draw(Plotly, el, fig, extra)) listenForPicks(el, onPick);
  }
  const timeline = container.querySelector('[data-chart="timeline"]');
  const fig = timelineFigure(overlay.events, overlay.kinds, theme, overlay.highlight, uirevision, epochs);
  if (await draw(Plotly, timeline, fig, extra)) listenForPicks(timeline, onPick);
  container.dataset.highlight = overlay.highlight || '';
  setEventCounts(container, overlay.events);
  updateLrList(container, scalars);
}

function listenForPicks(el, onPick) {
  if (el.dataset.picks || !el.on) return;
  el.dataset.picks = '1';
  el.on('plotly_click', (data) => {
    const id = data && data.points && data.points[0] && data.points[0].customdata;
    if (typeof id === 'string') onPick(id);
  });
}
