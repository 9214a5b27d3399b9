// The overview: every run in the logdir, newest first, with a checkbox per run to compare
// several side by side. Rows are built once and updated in place on every poll.

import {getJson, lastError} from './model.js';
import {h, setText, overviewTable, overviewRow, updateOverviewRow} from './views.js';

export class Overview {
  /**
   * @param {function(string)} onOpen opens one run's page
   * @param {function(string[])} onCompare opens the comparison of several runs
   * @param {import('./model.js').Config} config
   */
  constructor(onOpen, onCompare, config) {
    Object.assign(this, {onOpen, config, closed: false, selected: new Set()});
    this.table = overviewTable();
    this.rows = new Map();
    this.status = h('div', {class: 'conn muted', testid: 'overview-connection'});
    this.empty = h('div', {class: 'empty', testid: 'overview-empty', hidden: true});
    this.count = h('span', {class: 'muted', testid: 'run-count'});
    this.compare = h('button', {class: 'btn tone-accent', testid: 'compare-selected', disabled: true,
      title: 'Tick two or more runs to overlay their curves',
      onClick: () => onCompare([...this.rows.keys()].filter((r) => this.selected.has(r)))});
    this.el = h('div', {class: 'overview', testid: 'overview'},
        h('div', {class: 'overview-header'}, h('h2', {text: 'Training runs'}), this.count, this.status,
            h('span', {class: 'spacer'}), this.compare),
        this.empty, this.table);
  }

  destroy() { this.closed = true; }

  select(run, checked) {
    if (checked) this.selected.add(run);
    else this.selected.delete(run);
    const n = this.selected.size;
    setText(this.compare, n ? `Compare ${n} selected` : 'Compare selected');
    this.compare.disabled = n < 2;
  }

  async poll() {
    const data = await getJson('runs');
    if (this.closed) return;
    setText(this.status, data ? '' : `Connection problem: ${lastError || 'no answer'}; retrying…`);
    if (!data) return;
    const runs = data.runs;
    const serverNow = data.server_time || Date.now() / 1000;
    setText(this.count, `${runs.length} run${runs.length === 1 ? '' : 's'}`);
    this.empty.hidden = runs.length > 0;
    this.table.hidden = runs.length === 0;
    if (!runs.length) {
      setText(this.empty, 'No tbhealth runs in this logdir yet. Start one with: tbhealth train CONFIG --logdir <this logdir>');
    }
    const tbody = this.table.tBodies[0];
    const seen = new Set();
    runs.forEach((r, i) => {
      seen.add(r.run);
      let tr = this.rows.get(r.run);
      if (!tr) {
        tr = overviewRow(r.run, this.onOpen, (run, checked) => this.select(run, checked));
        this.rows.set(r.run, tr);
      }
      updateOverviewRow(tr, r, serverNow, this.config.states.live);
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    for (const [name, tr] of this.rows) {
      if (!seen.has(name)) { tr.remove(); this.rows.delete(name); this.select(name, false); }
    }
  }
}
