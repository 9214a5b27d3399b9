// Runs side by side: the runs ticked in the overview, their validation curves overlaid (train
// dashed) and a row of status per run: "which of my runs is healthy" in one view.

import {getJson, lastError} from './model.js';
import {h, routeHref, setText, badge, setBadge, fmtNum, fmtPct} from './views.js';
import {plotlyOrNote, xy, line, baseLayout, integerAxis, maxOf, emptyNote, draw} from './plotting.js';

const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f'];
const TAGS = 'train/loss,val/loss,train/acc,val/acc';
const COLUMNS = ['Run', 'State', 'Epoch', 'Val loss', 'Val acc', 'Alerts', 'Health'];

/** Overlaid curves of one metric (`loss` or `acc`) for every run: val solid, train dashed. Pure. */
export function compareFigure(metric, runs, scalarsByRun, theme) {
  const scale = metric === 'acc' ? 100 : 1;
  const layout = baseLayout(theme, metric === 'loss' ? 'Validation loss (train dashed)' : 'Validation accuracy % (train dashed)',
      'epoch', `compare-${metric}`, 320);
  layout.legend = {orientation: 'h', y: -0.25};
  const traces = [];
  runs.forEach((run, i) => {
    const series = (scalarsByRun.get(run) || {}).series || {};
    const color = PALETTE[i % PALETTE.length];
    traces.push(line(xy(series, `val/${metric}`, scale), run, color, {legendgroup: run}));
    traces.push(line(xy(series, `train/${metric}`, scale), `${run} (train)`, color,
        {legendgroup: run, showlegend: false, line: {color, width: 1.5, dash: 'dash'}, marker: {size: 3}}));
  });
  Object.assign(layout.xaxis, integerAxis(maxOf(...traces.map((t) => t.x))));
  if (traces.every((t) => !t.x.length)) emptyNote(layout, 'No data yet');
  return {traces, layout};
}

export class ComparePage {
  /**
   * @param {string[]} runs
   * @param {import('./model.js').Config} config
   * @param {function(): Object} theme current chart colours
   */
  constructor(runs, config, theme) {
    Object.assign(this, {runs, config, theme, closed: false, scalars: new Map()});
    this.conn = h('span', {class: 'conn muted', testid: 'compare-connection'});
    this.body = h('tbody');
    this.rows = new Map(runs.map((run, i) => [run, this.row(run, PALETTE[i % PALETTE.length])]));
    this.body.append(...this.rows.values());
    this.charts = ['loss', 'acc'].map((m) => h('div', {class: 'chart', testid: `compare-${m}`, 'data-metric': m},
        h('div', {class: 'chart-placeholder muted', text: 'Loading charts…'})));
    this.el = h('div', {class: 'compare-page', testid: 'compare-page'},
        h('div', {class: 'run-header'}, h('a', {href: routeHref(''), class: 'back', testid: 'back-link', text: '← All runs'}),
            h('h2', {text: `Comparing ${runs.length} runs`}), this.conn),
        h('section', {class: 'section'}, h('table', {class: 'runs compare-table', testid: 'compare-table'},
            h('thead', {}, h('tr', {}, COLUMNS.map((c) => h('th', {text: c})))), this.body)),
        h('section', {class: 'section'}, h('div', {class: 'charts'}, this.charts.map((c) => h('div', {class: 'chart-card'}, c)))));
  }

  destroy() { this.closed = true; }

  row(run, color) {
    return h('tr', {testid: 'compare-row', 'data-run': run},
        h('td', {}, h('span', {class: 'swatch', style: {background: color}}),
            h('a', {href: routeHref(`run=${encodeURIComponent(run)}`), class: 'run-link', text: run})),
        h('td', {}, badge(null)), h('td', {class: 'num'}), h('td', {class: 'num'}), h('td', {class: 'num'}),
        h('td', {class: 'num'}), h('td', {class: 'num'}));
  }

  updateRow(tr, r) {
    const c = tr.children;
    setBadge(c[1].firstChild, r ? r.state : 'missing');
    if (!r) return;
    setText(c[2], r.epoch === null ? '—' : `${r.epoch}/${r.total_epochs ?? '?'}`);
    setText(c[3], fmtNum(r.val_loss));
    setText(c[4], fmtPct(r.val_acc));
    setText(c[5], r.alerts_active ? `⚠ ${r.alerts_active}` : '0');
    c[5].className = `num${r.alerts_active ? ' has-alerts' : ''}`;
    setText(c[6], r.health_score == null ? '—' : Math.round(r.health_score));
  }

  async poll() {
    const [summary, ...scalars] = await Promise.all([getJson('runs'), ...this.runs.map((run) => getJson('scalars', {run, tags: TAGS}))]);
    if (this.closed) return;
    setText(this.conn, summary ? '' : `${lastError || 'connection problem'}: showing the last data received`);
    if (summary) {
      const byName = new Map(summary.runs.map((r) => [r.run, r]));
      for (const [run, tr] of this.rows) this.updateRow(tr, byName.get(run));
    }
    scalars.forEach((s, i) => { if (s) this.scalars.set(this.runs[i], s); });
    const Plotly = await plotlyOrNote(this.charts);
    if (!Plotly) return;
    const theme = this.theme();
    for (const el of this.charts) await draw(Plotly, el, compareFigure(el.dataset.metric, this.runs, this.scalars, theme), [theme.fg]);
  }
}
