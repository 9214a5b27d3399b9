// The run page: alerts, status, progress, metric cards, curves with their events, the per-layer
// view, logs and controls of one run. Built once when the run is opened; every poll updates the
// same elements in place. State names, metric keys and thresholds come from GET config.

import {RunModel, getRunConfig, lastError} from './model.js';
import {h, routeHref, setText, badge, setBadge, bar, setBar, stat, stateTone, fmtNum, fmtPct, fmtSig, fmtDuration,
  fmtBytes, fmtClock} from './views.js';
import {chartsSection, updateCharts} from './charts.js';
import {KINDS} from './events.js';
import {AlertsView} from './alerts.js';
import {LayersView} from './layers.js';
import {Controls} from './controls.js';

const LOG_LINES_SHOWN = 2000;
/** Until the run's own settings arrive: the plateau rule's documented default. */
const DEFAULT_FLAT = 0.001;

/** How a metric key is shown: accuracies in percent (higher is better), losses lower is better. */
export function cardSpec(key) {
  const words = key.split('_').map((w) => ({acc: 'accuracy', lr: 'LR'}[w] || w)).join(' ');
  const acc = key.endsWith('_acc');
  return {key, label: words.charAt(0).toUpperCase() + words.slice(1), acc,
    higherIsBetter: acc ? true : key.endsWith('_loss') ? false : null};
}

/**
 * Direction and colour of a metric's change: green improving, yellow flat, red worse, none for
 * a metric without a better direction. Flat: a change below `flat` × the value (the plateau
 * rule's `min_delta`: what the health engine calls no meaningful improvement).
 */
export function trend(delta, value, higherIsBetter, flat = DEFAULT_FLAT) {
  if (typeof delta !== 'number' || !Number.isFinite(delta)) return {tone: 'none', arrow: ''};
  const arrow = delta > 0 ? '▲' : delta < 0 ? '▼' : '▶';
  if (Math.abs(delta) <= flat * Math.abs(typeof value === 'number' ? value : 0) || delta === 0) return {tone: 'flat', arrow: '▶'};
  if (higherIsBetter === null) return {tone: 'none', arrow};
  return {tone: (higherIsBetter ? delta > 0 : delta < 0) ? 'good' : 'bad', arrow};
}

function metric(status, key) {
  const m = status && status.metrics ? status.metrics[key] : null;
  return m && typeof m === 'object' ? m : {value: m ?? null, delta: null};
}

function section(title, testid, ...children) {
  return h('section', {class: 'section', testid}, title ? h('h3', {class: 'section-title', text: title}) : null, ...children);
}

export class RunPage {
  /**
   * @param {string} run
   * @param {import('./model.js').Config} config
   * @param {function(): Object} theme current chart colours
   */
  constructor(run, config, theme) {
    Object.assign(this, {run, config, theme, model: new RunModel(run), runConfig: null});
    this.overlay = {events: [], kinds: new Set(Object.keys(KINDS)), highlight: null};
    this.alerts = new AlertsView(run, (id) => this.showEvent(id));
    this.layers = new LayersView();
    this.controls = new Controls(run, config, () => this.model.closed);
    this.el = this.build();
  }

  destroy() { this.model.close(); }

  get thresholds() { return (this.runConfig && this.runConfig.thresholds) || {}; }

  // ---------------------------------------------------------------------------- building

  build() {
    const e = this.els = {};
    e.badge = badge(null, 'run-state');
    const header = h('div', {class: 'run-header'},
        h('a', {href: routeHref(''), class: 'back', testid: 'back-link', text: '← All runs'}),
        h('h2', {class: 'run-title', testid: 'run-title', text: this.run}), e.badge,
        e.conn = h('span', {class: 'conn muted', testid: 'run-connection'}));

    const cells = [
      ['Epoch', 'status-epoch'], ['Elapsed', 'status-elapsed'], ['ETA', 'status-eta'], ['Health score', 'status-health'],
      ['Ended', 'status-ended'], ['CPU', 'status-cpu'], ['RAM', 'status-ram'], ['Disk I/O', 'status-disk'],
    ].map(([label, id]) => { const [w, v] = stat(label, id); e[id] = v; w.dataset.stat = id; return w; });
    e.gpuBar = bar('gpu-bar');
    e.gpuText = h('span', {class: 'stat-value', testid: 'status-gpu'});
    const gpu = h('div', {class: 'stat stat-wide'}, h('span', {class: 'stat-label', text: 'GPU memory'}), e.gpuBar, e.gpuText);
    e.message = h('div', {class: 'run-message muted', testid: 'status-message'});
    const status = section('Status', 'section-status', h('div', {class: 'stats'}, cells, gpu), e.message);

    e.overall = bar('progress-overall');
    e.overallLabel = h('span', {class: 'progress-label', testid: 'progress-overall-label'});
    e.epochBar = bar('progress-epoch', 'soft');
    e.epochLabel = h('span', {class: 'progress-label', testid: 'progress-epoch-label'});
    const progress = section('Progress', 'section-progress',
        h('div', {class: 'progress-row'}, h('span', {class: 'progress-name', text: 'Overall'}), e.overall, e.overallLabel),
        h('div', {class: 'progress-row'}, h('span', {class: 'progress-name', text: 'This epoch'}), e.epochBar, e.epochLabel));

    e.cards = this.config.metric_keys.map((key) => {
      const c = cardSpec(key);
      const value = h('div', {class: 'card-value', testid: 'card-value'});
      const delta = h('div', {class: 'card-delta', testid: 'card-delta'});
      const card = h('div', {class: 'card', testid: `card-${key.replace(/_/g, '-')}`}, h('div', {class: 'card-label', text: c.label}), value, delta);
      return {...c, card, value, delta};
    });
    e.gap = h('div', {class: 'gap-flag', testid: 'acc-gap', hidden: true});
    const cards = section('Metrics', 'section-cards', h('div', {class: 'cards'}, e.cards.map((c) => c.card)), e.gap);

    e.charts = chartsSection(this.overlay, () => this.redrawCharts());
    e.chartsSection = section('Curves and events', 'section-charts', e.charts);
    const layers = section('Layers', 'section-layers', this.layers.el);

    e.warnCount = h('span', {class: 'count tone-warn', testid: 'log-warnings'});
    e.errCount = h('span', {class: 'count tone-bad', testid: 'log-errors'});
    e.logs = h('div', {class: 'logs', testid: 'logs', tabindex: 0});
    e.logNote = h('div', {class: 'muted small', testid: 'logs-note'});
    const logs = section('Logs', 'section-logs', h('div', {class: 'log-counts'}, e.warnCount, e.errCount), e.logs, e.logNote);

    const controls = section('Controls', 'section-controls', this.controls.el);
    return h('div', {class: 'run-page', testid: 'run-page'}, header, this.alerts.banners, this.alerts.history, status, progress,
        cards, e.chartsSection, layers, logs, controls);
  }

  // ---------------------------------------------------------------------------- updating

  /** Fetch and show the latest state. Resolves once the page is up to date. The time it took is
   * recorded as the User Timing measures `tbhealth-fetch` and `tbhealth-render` (benchmarks/bench_tab.py). */
  async poll() {
    const t0 = performance.now();
    const [delta, runConfig] = await Promise.all([this.model.refresh(), this.runConfig ? null : getRunConfig(this.run)]);
    if (!delta) return;
    if (runConfig) this.runConfig = runConfig;
    const t1 = performance.now();
    const m = this.model;
    setText(this.els.conn, m.ok ? '' : `${lastError || 'connection problem'}: showing the last data received`);
    if (m.status) {
      this.updateStatus(m.status);
      this.updateCards(m.status);
      this.controls.update(m.status.state, m.status.resume_hint);
    }
    this.alerts.update(m.alerts, this.config.severities);
    this.appendLogs(delta.newLogs);
    this.tick();
    this.overlay.events = m.events;
    await this.redrawCharts();
    const flagged = new Set(m.activeAlerts().flatMap((a) => [a.layer, ...(a.layers || []).map((l) => l && l.layer)]).filter(Boolean));
    await this.layers.update(m.layers, flagged, this.thresholds, this.theme(), this.run);
    performance.measure('tbhealth-fetch', {start: t0, end: t1});
    performance.measure('tbhealth-render', {start: t1, end: performance.now()});
  }

  redrawCharts() {
    return updateCharts(this.els.charts, this.model.scalars, this.theme(), this.run, this.overlay, (id) => this.showEvent(id, false));
  }

  /**
   * Mark the event with this id (an alert's or a control request's) on every chart. From a link
   * (`fromLink`): mark it and scroll to the charts; from a click on a marker: mark, or unmark when
   * it is marked already.
   */
  async showEvent(id, fromLink = true) {
    this.overlay.highlight = !fromLink && this.overlay.highlight === id ? null : id;
    const event = this.overlay.events.find((ev) => ev.id === id);
    if (event && !this.overlay.kinds.has(event.kind)) {
      this.overlay.kinds.add(event.kind);
      this.els.charts.querySelector(`[data-testid="toggle-${event.kind}"]`).checked = true;
    }
    if (fromLink) this.els.chartsSection.scrollIntoView({behavior: 'smooth', block: 'start'});
    await this.redrawCharts();
  }

  /** Called every second: the ETA counts down and elapsed time counts up between polls. */
  tick() {
    const s = this.model.status;
    if (!s) return;
    const serverNow = Date.now() / 1000 - this.model.clockSkew;
    const since = s.state === 'training' && s.updated_at ? Math.max(0, serverNow - s.updated_at) : 0;
    setText(this.els['status-elapsed'], fmtDuration((s.elapsed_s || 0) + since));
    const live = this.config.states.live.includes(s.state);
    let eta = '—';
    if (s.state === 'completed') eta = 'done';
    else if (live && typeof s.eta_s === 'number') eta = fmtDuration(Math.max(0, s.eta_s - since)) + (s.state === 'paused' ? ' (paused)' : '');
    else if (live) eta = 'estimating…';
    setText(this.els['status-eta'], eta);
  }

  updateStatus(s) {
    const e = this.els;
    setBadge(e.badge, s.state);
    setText(e['status-epoch'], `${s.epoch ?? 0}/${s.total_epochs ?? '?'}`);
    setText(e['status-health'], typeof s.health_score === 'number' ? `${Math.round(s.health_score)}/100` : '—');
    const final = this.config.states.final.includes(s.state);
    e['status-ended'].parentElement.hidden = !final;
    setText(e['status-ended'], final && s.updated_at ? `${new Date(s.updated_at * 1000).toLocaleDateString()} ${fmtClock(s.updated_at)}` : '');
    this.updateSystem(s);
    const note = s.reported_state && s.state !== s.reported_state  // the reader's verdict: no heartbeat
      ? `No heartbeat for ${fmtDuration(Date.now() / 1000 - this.model.clockSkew - s.updated_at)} (last reported: ${s.reported_state}).`
      : (s.message || '');
    setText(e.message, note);

    setBar(e.overall, s.progress, stateTone(s.state) === 'bad' ? 'bad' : 'accent');
    setText(e.overallLabel, typeof s.progress === 'number' ? `${(s.progress * 100).toFixed(1)} %` : '—');
    const per = s.batches_per_epoch;
    setBar(e.epochBar, per ? (s.batch || 0) / per : 0, 'soft');
    setText(e.epochLabel, `Epoch ${s.epoch ?? 0}/${s.total_epochs ?? '?'} – Batch ${s.batch ?? 0}/${per ?? '?'}`);
  }

  /** CPU, RAM, disk and GPU readings: shown only while the heartbeat is current, never the last
   * readings of a run that has ended or stopped answering as if they were live. */
  updateSystem(s) {
    const e = this.els;
    const running = this.config.states.running.includes(s.state);
    const sys = running ? s.system || {} : {};
    const off = this.config.states.final.includes(s.state) ? 'run ended' : 'no heartbeat';
    const gone = (v) => (running ? v : `— (${off})`);
    setText(e['status-cpu'], gone(typeof sys.cpu_percent === 'number' ? `${sys.cpu_percent.toFixed(0)} %` : '—'));
    setText(e['status-ram'], gone(sys.ram_used_bytes == null ? '—'
      : fmtBytes(sys.ram_used_bytes) + (sys.ram_total_bytes ? ` / ${fmtBytes(sys.ram_total_bytes)}` : '')));
    setText(e['status-disk'], gone(sys.disk_read_bps == null ? '—'
      : `read ${fmtBytes(sys.disk_read_bps)}/s · write ${fmtBytes(sys.disk_write_bps)}/s`));
    const gpu = sys.gpu;
    e.gpuBar.hidden = !gpu;
    if (gpu && gpu.memory_total_bytes) {
      const f = gpu.memory_used_bytes / gpu.memory_total_bytes;
      const t = this.thresholds;
      setBar(e.gpuBar, f, f > (t.gpu_memory_critical ?? 1) ? 'bad' : f > (t.gpu_memory_warning ?? 1) ? 'warn' : 'accent');
      setText(e.gpuText, `${gpu.name}: ${fmtBytes(gpu.memory_used_bytes)} / ${fmtBytes(gpu.memory_total_bytes)} (${(f * 100).toFixed(0)} %)`);
    } else {
      setText(e.gpuText, running ? 'no GPU' : `— (${off})`);
    }
  }

  updateCards(s) {
    const flat = this.thresholds.flat_change ?? DEFAULT_FLAT;
    for (const c of this.els.cards) {
      const m = metric(s, c.key);
      setText(c.value, c.acc ? fmtPct(m.value) : c.higherIsBetter === null ? fmtSig(m.value) : fmtNum(m.value));
      const t = trend(m.delta, m.value, c.higherIsBetter, flat);
      const sign = typeof m.delta === 'number' && m.delta >= 0 ? '+' : '';
      const d = typeof m.delta !== 'number' ? '' : c.acc ? `${sign}${(m.delta * 100).toFixed(1)} pts`
        : `${sign}${c.higherIsBetter === null ? fmtSig(m.delta) : fmtNum(m.delta, 3)}`;
      setText(c.delta, d ? `${t.arrow} ${d}` : 'no change yet');
      c.card.className = `card trend-${t.tone}`;
      c.card.dataset.trend = t.tone;
    }
    // The overfitting rule's accuracy gap, with this run's threshold (train and val accuracy: the
    // `_acc` keys, train first as GET config lists them).
    const [train, val] = this.els.cards.filter((c) => c.acc).map((c) => metric(s, c.key).value);
    const limit = this.thresholds.acc_gap_points;
    const gap = typeof train === 'number' && typeof val === 'number' ? (train - val) * 100 : null;
    const flagged = gap !== null && typeof limit === 'number' && gap > limit;
    this.els.gap.hidden = !flagged;
    if (flagged) setText(this.els.gap, `⚠ Train–val accuracy gap ${gap.toFixed(1)} points (> ${limit}): the model may be overfitting.`);
  }

  appendLogs(records) {
    const e = this.els;
    const box = e.logs;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 8;
    if (records.length) {
      const frag = document.createDocumentFragment();
      for (const r of records) {
        const level = String(r.level || 'INFO');
        frag.append(h('div', {class: `log-line level-${level.toLowerCase()}`, testid: 'log-line'},
            h('span', {class: 'log-time', text: fmtClock(r.time)}), h('span', {class: 'log-level', text: level.padEnd(7)}),
            h('span', {class: 'log-msg', text: r.message})));
      }
      box.append(frag);
      while (box.childElementCount > LOG_LINES_SHOWN) box.firstChild.remove();
      if (atBottom) box.scrollTop = box.scrollHeight;  // follow the tail unless the user scrolled up
    }
    // The trainer's own counts cover the whole run; the page's cover only what it received.
    const given = this.model.status && this.model.status.log_counts;
    const warnings = given ? given.warnings : this.model.counts.WARNING;
    const errors = given ? given.errors : this.model.counts.ERROR;
    setText(e.warnCount, `${warnings} warning${warnings === 1 ? '' : 's'}`);
    setText(e.errCount, `${errors} error${errors === 1 ? '' : 's'}`);
    setText(e.logNote, this.model.skippedLogs ? `${this.model.skippedLogs} older records not shown.` : (box.childElementCount ? '' : 'No log records yet.'));
  }
}
