// Alerts on the run page: one banner per open rule episode, most severe first, and the history
// table with filters. Every alert links to its marker on the charts ("show on chart").
//
// One root cause is one banner: open alerts are grouped by (rule, rank) here, whether the health
// engine wrote one alert per layer or one alert listing its layers in `layers` ("+9 layers").

import {dismissedAlerts, dismissAlert} from './model.js';
import {h, setText, fmtClock} from './views.js';

/** Layer names a banner lists before "…". */
const LAYERS_LISTED = 4;

/**
 * @typedef {{key: string, rule: string, rank: ?number, severity: string, time: number,
 *   lead: Object, alerts: Object[], layers: string[]}} AlertGroup
 */

/** Layers an alert names: its `layers` list (worst first) or its single `layer`. */
function layersOf(a) {
  const listed = Array.isArray(a.layers) ? a.layers.map((l) => (l && typeof l === 'object' ? l.layer : l)) : [];
  return [...new Set([a.layer, ...listed].filter((l) => typeof l === 'string' && l))];
}

/**
 * Open alerts grouped by (rule, rank), ordered by severity (as `severities` lists them, most
 * severe first) then newest first. A group's lead is its most severe, then earliest, alert. Pure.
 * @param {Object[]} alerts open alerts
 * @param {string[]} severities
 * @return {AlertGroup[]}
 */
export function groupAlerts(alerts, severities) {
  const rank = (s) => { const i = severities.indexOf(s); return i < 0 ? severities.length : i; };
  const groups = new Map();
  for (const a of [...alerts].sort((x, y) => (x.time || 0) - (y.time || 0))) {
    const key = `${a.rule}|${a.rank ?? ''}`;
    if (!groups.has(key)) groups.set(key, {key, rule: a.rule, rank: a.rank ?? null, alerts: []});
    groups.get(key).alerts.push(a);
  }
  const out = [...groups.values()].map((g) => {
    const lead = g.alerts.reduce((best, a) => (rank(a.severity) < rank(best.severity) ? a : best), g.alerts[0]);
    const layers = [...new Set([lead, ...g.alerts].flatMap(layersOf))];
    return {...g, lead, layers, severity: lead.severity, time: Math.max(...g.alerts.map((a) => a.time || 0))};
  });
  return out.sort((a, b) => rank(a.severity) - rank(b.severity) || b.time - a.time);
}

/** A banner's text: severity, rule, rank, the lead alert's message and the other layers. */
export function bannerText(g) {
  const others = g.layers.slice(1);
  const more = others.length
    ? ` (+${others.length} layer${others.length === 1 ? '' : 's'}: ${others.slice(0, LAYERS_LISTED).join(', ')}${others.length > LAYERS_LISTED ? ', …' : ''})`
    : '';
  const where = g.lead.epoch != null ? ` — since epoch ${g.lead.epoch}` : '';
  return `${String(g.severity).toUpperCase()} · ${g.rule}${g.rank != null ? ` [rank ${g.rank}]` : ''}: ${g.lead.message}${more}${where}`;
}

export class AlertsView {
  /**
   * @param {string} run
   * @param {function(string)} onShow highlights the alert with this id on the charts
   */
  constructor(run, onShow) {
    this.run = run;
    this.onShow = onShow;
    this.dismissed = dismissedAlerts(run);
    this.filters = {severity: '', rule: '', status: ''};
    this.banners = h('div', {class: 'banners', testid: 'alert-banners'});
    this.count = h('span');
    this.body = h('tbody');
    this.filterBar = h('div', {class: 'alert-filters', testid: 'alert-filters'},
        this.select('severity', 'All severities'), this.select('rule', 'All rules'), this.select('status', 'Active and resolved'));
    this.history = h('details', {class: 'alert-history', testid: 'alert-history'},
        h('summary', {}, 'Alert history ', this.count), this.filterBar,
        h('table', {class: 'alerts-table'},
            h('thead', {}, h('tr', {}, ['Time', 'Epoch', 'Step', 'Severity', 'Rule', 'Layer', 'Message', 'Status', ''].map((t) => h('th', {text: t})))),
            this.body));
  }

  select(name, all) {
    return h('select', {testid: `alert-filter-${name}`, 'aria-label': all, onChange: (e) => {
      this.filters[name] = e.target.value;
      delete this.body.dataset.sig;  // redraw even when no row is left ('' is the empty table's signature)
      if (this.last) this.update(...this.last);
    }}, h('option', {value: '', text: all}));
  }

  /** @param {Map<string, Object>} alerts every episode by id @param {string[]} severities */
  update(alerts, severities) {
    this.last = [alerts, severities];
    const all = [...alerts.values()];
    this.updateBanners(groupAlerts(all.filter((a) => !a.resolved), severities));
    this.updateHistory(all.sort((a, b) => (b.time || 0) - (a.time || 0)), severities);
  }

  updateBanners(groups) {
    const shown = groups.filter((g) => g.alerts.some((a) => !this.dismissed.has(a.id)));
    const keep = new Set(shown.map((g) => g.key));
    for (const el of [...this.banners.children]) if (!keep.has(el.dataset.group)) el.remove();
    shown.forEach((g, i) => {
      let el = [...this.banners.children].find((b) => b.dataset.group === g.key);
      if (!el) el = this.banner(g);
      el.group = g;
      el.dataset.alertId = g.lead.id;
      el.dataset.severity = g.severity;
      el.dataset.layers = String(g.layers.length);
      el.className = `banner sev-${g.severity}`;
      setText(el.firstChild, bannerText(g));
      if (this.banners.children[i] !== el) this.banners.insertBefore(el, this.banners.children[i] || null);
    });
  }

  banner(g) {
    const el = h('div', {testid: 'alert-banner', 'data-group': g.key, role: 'alert'},
        h('span', {class: 'banner-text'}),
        h('button', {class: 'link-button', testid: 'alert-show-banner', text: 'Show on chart', onClick: () => this.onShow(el.group.lead.id)}),
        h('button', {class: 'banner-close', testid: 'alert-dismiss', title: 'Dismiss', 'aria-label': 'Dismiss alert', text: '×',
          onClick: () => {
            for (const a of el.group.alerts) { dismissAlert(this.run, a.id); this.dismissed.add(a.id); }
            el.remove();
          }}));
    return el;
  }

  updateHistory(all, severities) {
    const nActive = all.filter((a) => !a.resolved).length;
    setText(this.count, all.length ? `(${all.length}: ${nActive} active, ${all.length - nActive} resolved)` : '(none so far)');
    this.setOptions('severity', severities.filter((s) => all.some((a) => a.severity === s)));
    this.setOptions('rule', [...new Set(all.map((a) => a.rule))].sort());
    this.setOptions('status', ['active', 'resolved']);
    const f = this.filters;
    const rows = all.filter((a) => (!f.severity || a.severity === f.severity) && (!f.rule || a.rule === f.rule)
        && (!f.status || (f.status === 'resolved') === !!a.resolved));
    const sig = rows.map((a) => `${a.id}:${a.resolved}:${layersOf(a).length}`).join('|');
    if (this.body.dataset.sig === sig) return;
    this.body.dataset.sig = sig;
    this.body.replaceChildren(...rows.map((a) => {
      const layers = layersOf(a);
      return h('tr', {class: a.resolved ? 'resolved' : `sev-${a.severity}`, testid: 'alert-row', 'data-alert-id': a.id},
          h('td', {text: fmtClock(a.time)}), h('td', {text: a.epoch ?? ''}), h('td', {text: a.step ?? ''}), h('td', {text: a.severity}),
          h('td', {text: a.rule}), h('td', {text: layers.length > 1 ? `${layers[0]} +${layers.length - 1}` : layers[0] || ''}),
          h('td', {text: a.message}), h('td', {text: a.resolved ? 'resolved' : 'active'}),
          h('td', {}, h('button', {class: 'link-button', testid: 'alert-show', text: 'Show', title: 'Show on the charts',
            onClick: () => this.onShow(a.id)})));
    }));
  }

  /** Keep a filter's options equal to `values` (the chosen one stays chosen). */
  setOptions(name, values) {
    const sel = this.filterBar.querySelector(`[data-testid="alert-filter-${name}"]`);
    const have = [...sel.options].slice(1).map((o) => o.value);
    if (have.join('|') === values.join('|')) return;
    sel.replaceChildren(sel.options[0], ...values.map((v) => h('option', {value: v, text: v})));
    sel.value = values.includes(this.filters[name]) ? this.filters[name] : '';
  }
}
