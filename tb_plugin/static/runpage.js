// The run page: alerts, status, progress, metric cards, charts, logs and controls of one run.
// Built once when the run is opened; every poll updates the same elements in place.

import {RunModel, lastError, postControl, waitForAck, checkpointUrl, dismissedAlerts, dismissAlert, LIVE_STATES} from './model.js';
import {h, routeHref, setText, badge, setBadge, bar, setBar, stat, stateTone, fmtNum, fmtPct, fmtDuration, fmtBytes,
  fmtClock, confirmDialog} from './views.js';
import {chartsSection, updateCharts} from './charts.js';

/** Train–val accuracy gap (points) above which the cards flag possible overfitting. */
const GAP_POINTS = 10;
const CARDS = [
  {key: 'train_loss', label: 'Train loss', higherIsBetter: false},
  {key: 'val_loss', label: 'Val loss', higherIsBetter: false},
  {key: 'train_acc', label: 'Train accuracy', higherIsBetter: true},
  {key: 'val_acc', label: 'Val accuracy', higherIsBetter: true},
];
const LOG_LINES_SHOWN = 2000;

/** Direction and colour of a metric's change: green improving, yellow flat, red worse. */
export function trend(delta, value, higherIsBetter) {
  if (typeof delta !== 'number' || !Number.isFinite(delta)) return {tone: 'none', arrow: ''};
  const flat = higherIsBetter ? 0.001 : Math.max(1e-4, Math.abs(typeof value === 'number' ? value : 0) * 0.002);
  if (Math.abs(delta) <= flat) return {tone: 'flat', arrow: '▶'};
  const improving = higherIsBetter ? delta > 0 : delta < 0;
  return {tone: improving ? 'good' : 'bad', arrow: delta > 0 ? '▲' : '▼'};
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
   * @param {{read_only: boolean}} config
   * @param {function(): Object} theme current chart colours
   */
  constructor(run, config, theme) {
    this.model = new RunModel(run);
    this.run = run;
    this.config = config;
    this.theme = theme;
    this.dismissed = dismissedAlerts(run);
    this.busy = false;
    this.el = this.build();
  }

  destroy() { this.model.close(); }

  // ---------------------------------------------------------------------------- building

  build() {
    const e = this.els = {};
    e.badge = badge(null, 'run-state');
    const header = h('div', {class: 'run-header'},
        h('a', {href: routeHref(''), class: 'back', testid: 'back-link', text: '← All runs'}),
        h('h2', {class: 'run-title', testid: 'run-title', text: this.run}), e.badge,
        e.conn = h('span', {class: 'conn muted', testid: 'run-connection'}));

    e.banners = h('div', {class: 'banners', testid: 'alert-banners'});
    e.historyCount = h('span');
    e.historyBody = h('tbody');
    const history = h('details', {class: 'alert-history', testid: 'alert-history'},
        h('summary', {}, 'Alert history ', e.historyCount),
        h('table', {class: 'alerts-table'},
            h('thead', {}, h('tr', {}, ['Time', 'Epoch', 'Severity', 'Rule', 'Layer', 'Message', 'Status'].map((t) => h('th', {text: t})))),
            e.historyBody));

    const cells = [
      ['Epoch', 'status-epoch'], ['Elapsed', 'status-elapsed'], ['ETA', 'status-eta'], ['Health score', 'status-health'],
      ['CPU', 'status-cpu'], ['RAM', 'status-ram'], ['Disk I/O', 'status-disk'],
    ].map(([label, id]) => { const [w, v] = stat(label, id); e[id] = v; return w; });
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

    e.cards = CARDS.map((c) => {
      const value = h('div', {class: 'card-value', testid: 'card-value'});
      const delta = h('div', {class: 'card-delta', testid: 'card-delta'});
      const card = h('div', {class: 'card', testid: `card-${c.key.replace('_', '-')}`}, h('div', {class: 'card-label', text: c.label}), value, delta);
      return {...c, card, value, delta};
    });
    e.gap = h('div', {class: 'gap-flag', testid: 'acc-gap', hidden: true});
    const cards = section('Metrics', 'section-cards', h('div', {class: 'cards'}, e.cards.map((c) => c.card)), e.gap);

    e.charts = chartsSection();
    const charts = section('Curves', 'section-charts', e.charts);

    e.warnCount = h('span', {class: 'count tone-warn', testid: 'log-warnings'});
    e.errCount = h('span', {class: 'count tone-bad', testid: 'log-errors'});
    e.logs = h('div', {class: 'logs', testid: 'logs', tabindex: 0});
    e.logNote = h('div', {class: 'muted small', testid: 'logs-note'});
    const logs = section('Logs', 'section-logs', h('div', {class: 'log-counts'}, e.warnCount, e.errCount), e.logs, e.logNote);

    const controls = section('Controls', 'section-controls', this.buildControls());
    return h('div', {class: 'run-page', testid: 'run-page'}, header, e.banners, history, status, progress, cards, charts, logs, controls);
  }

  buildControls() {
    const e = this.els;
    if (this.config.read_only) {
      return h('div', {class: 'muted', testid: 'controls-readonly',
        text: 'Read-only mode (--tbhealth_read_only): pause, resume, stop and checkpoint are disabled here.'});
    }
    e.pause = h('button', {class: 'btn tone-warn', testid: 'btn-pause', text: 'Pause', onClick: () => this.control('pause')});
    e.resume = h('button', {class: 'btn tone-warn', testid: 'btn-resume', text: 'Resume', onClick: () => this.control('resume')});
    e.stop = h('button', {class: 'btn tone-bad', testid: 'btn-stop', text: 'Stop', onClick: () => this.confirmStop()});
    e.save = h('button', {class: 'btn tone-accent', testid: 'btn-checkpoint', text: 'Save checkpoint', onClick: () => this.control('checkpoint')});
    e.outcome = h('div', {class: 'control-outcome', testid: 'control-outcome', role: 'status'});
    e.download = h('div', {class: 'checkpoint-download', testid: 'checkpoint-download'});
    return h('div', {class: 'controls', testid: 'controls'}, h('div', {class: 'buttons'}, e.pause, e.resume, e.stop, e.save), e.outcome, e.download);
  }

  // ---------------------------------------------------------------------------- updating

  /** Fetch and show the latest state. Resolves once the page is up to date. */
  async poll() {
    const delta = await this.model.refresh();
    if (!delta) return;
    const m = this.model;
    setText(this.els.conn, m.ok ? '' : `${lastError || 'connection problem'}: showing the last data received`);
    if (m.status) {
      this.updateStatus(m.status);
      this.updateCards(m.status);
      this.updateControls(m.status);
    }
    this.updateAlerts();
    this.appendLogs(delta.newLogs);
    this.tick();
    await updateCharts(this.els.charts, m.scalars, this.theme(), this.run);
  }

  /** Called every second: the ETA counts down and elapsed time counts up between polls. */
  tick() {
    const s = this.model.status;
    if (!s) return;
    const serverNow = Date.now() / 1000 - this.model.clockSkew;
    const since = s.state === 'training' && s.updated_at ? Math.max(0, serverNow - s.updated_at) : 0;
    setText(this.els['status-elapsed'], fmtDuration((s.elapsed_s || 0) + since));
    const live = LIVE_STATES.includes(s.state);
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
    const sys = s.system || {};
    setText(e['status-cpu'], typeof sys.cpu_percent === 'number' ? `${sys.cpu_percent.toFixed(0)} %` : '—');
    setText(e['status-ram'], sys.ram_used_bytes == null ? '—'
      : fmtBytes(sys.ram_used_bytes) + (sys.ram_total_bytes ? ` / ${fmtBytes(sys.ram_total_bytes)}` : ''));
    setText(e['status-disk'], sys.disk_read_bps == null ? '—'
      : `read ${fmtBytes(sys.disk_read_bps)}/s · write ${fmtBytes(sys.disk_write_bps)}/s`);
    const gpu = sys.gpu;
    e.gpuBar.hidden = !gpu;
    if (gpu && gpu.memory_total_bytes) {
      const f = gpu.memory_used_bytes / gpu.memory_total_bytes;
      setBar(e.gpuBar, f, f > 0.95 ? 'bad' : f > 0.85 ? 'warn' : 'accent');
      setText(e.gpuText, `${gpu.name}: ${fmtBytes(gpu.memory_used_bytes)} / ${fmtBytes(gpu.memory_total_bytes)} (${(f * 100).toFixed(0)} %)`);
    } else {
      setText(e.gpuText, 'no GPU');
    }
    const note = s.state === 'unresponsive'
      ? `No heartbeat for ${fmtDuration(Date.now() / 1000 - this.model.clockSkew - s.updated_at)} (last reported: ${s.reported_state}).`
      : (s.message || '');
    setText(e.message, note);

    setBar(e.overall, s.progress, stateTone(s.state) === 'bad' ? 'bad' : 'accent');
    setText(e.overallLabel, typeof s.progress === 'number' ? `${(s.progress * 100).toFixed(1)} %` : '—');
    const per = s.batches_per_epoch;
    setBar(e.epochBar, per ? (s.batch || 0) / per : 0, 'soft');
    setText(e.epochLabel, `Epoch ${s.epoch ?? 0}/${s.total_epochs ?? '?'} – Batch ${s.batch ?? 0}/${per ?? '?'}`);
  }

  updateCards(s) {
    for (const c of this.els.cards) {
      const m = metric(s, c.key);
      const isAcc = c.key.endsWith('acc');
      setText(c.value, isAcc ? fmtPct(m.value) : fmtNum(m.value));
      const t = trend(m.delta, m.value, c.higherIsBetter);
      const d = typeof m.delta === 'number' ? (isAcc ? `${m.delta >= 0 ? '+' : ''}${(m.delta * 100).toFixed(1)} pts` : `${m.delta >= 0 ? '+' : ''}${fmtNum(m.delta, 3)}`) : '';
      setText(c.delta, d ? `${t.arrow} ${d}` : 'no change yet');
      c.card.className = `card trend-${t.tone}`;
      c.card.dataset.trend = t.tone;
    }
    const tr = metric(s, 'train_acc').value, va = metric(s, 'val_acc').value;
    const gap = typeof tr === 'number' && typeof va === 'number' ? (tr - va) * 100 : null;
    const flagged = gap !== null && gap > GAP_POINTS;
    this.els.gap.hidden = !flagged;
    if (flagged) setText(this.els.gap, `⚠ Train–val accuracy gap ${gap.toFixed(1)} points (> ${GAP_POINTS}): the model may be overfitting.`);
  }

  updateAlerts() {
    const e = this.els;
    const active = this.model.activeAlerts().filter((a) => !this.dismissed.has(a.id));
    const keep = new Set(active.map((a) => a.id));
    for (const el of [...e.banners.children]) if (!keep.has(el.dataset.alertId)) el.remove();
    active.forEach((a, i) => {
      let el = e.banners.querySelector(`[data-alert-id="${CSS.escape(a.id)}"]`);
      if (!el) {
        el = h('div', {class: `banner sev-${a.severity}`, testid: 'alert-banner', 'data-alert-id': a.id, role: 'alert'},
            h('span', {class: 'banner-text'}),
            h('button', {class: 'banner-close', testid: 'alert-dismiss', title: 'Dismiss', 'aria-label': 'Dismiss alert', text: '×',
              onClick: () => { dismissAlert(this.run, a.id); this.dismissed.add(a.id); el.remove(); }}));
      }
      setText(el.firstChild, `${a.severity.toUpperCase()} · ${a.rule}${a.layer ? ` (${a.layer})` : ''}: ${a.message}` + (a.epoch != null ? ` — epoch ${a.epoch}` : ''));
      if (e.banners.children[i] !== el) e.banners.insertBefore(el, e.banners.children[i] || null);
    });
    const all = [...this.model.alerts.values()].sort((a, b) => (b.time || 0) - (a.time || 0));
    const nActive = all.filter((a) => !a.resolved).length;
    setText(e.historyCount, all.length ? `(${all.length}: ${nActive} active, ${all.length - nActive} resolved)` : '(none so far)');
    const sig = all.map((a) => `${a.id}:${a.resolved}`).join('|');
    if (e.historyBody.dataset.sig !== sig) {
      e.historyBody.dataset.sig = sig;
      e.historyBody.replaceChildren(...all.map((a) => h('tr', {class: a.resolved ? 'resolved' : `sev-${a.severity}`, testid: 'alert-row'},
          h('td', {text: fmtClock(a.time)}), h('td', {text: a.epoch ?? ''}), h('td', {text: a.severity}), h('td', {text: a.rule}),
          h('td', {text: a.layer || ''}), h('td', {text: a.message}), h('td', {text: a.resolved ? 'resolved' : 'active'}))));
    }
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

  updateControls(s) {
    const e = this.els;
    if (this.config.read_only) return;
    const live = LIVE_STATES.includes(s.state);
    e.pause.hidden = s.state === 'paused';
    e.resume.hidden = s.state !== 'paused';
    for (const b of [e.pause, e.resume, e.stop, e.save]) {
      b.disabled = this.busy || !live;
      b.title = live ? '' : `The run is ${s.state}: controls work only on a live run.`;
    }
  }

  // ---------------------------------------------------------------------------- controls

  async confirmStop() {
    const ok = await confirmDialog(document.body, {
      title: `Stop run ${this.run}?`,
      body: `The trainer saves a checkpoint and ends training. This cannot be undone (later: ${this.model.status?.resume_hint ?? 'continue it with tbhealth train --resume'}).`,
      confirmText: 'Stop run', tone: 'bad', testid: 'confirm-stop',
    });
    if (ok) await this.control('stop');
  }

  /** Send a command, wait for the trainer's acknowledgement, show the outcome. */
  async control(command) {
    const e = this.els;
    this.busy = true;
    if (this.model.status) this.updateControls(this.model.status);
    e.outcome.className = 'control-outcome pending';
    setText(e.outcome, `${command}: sent, waiting for the trainer…`);
    try {
      const sent = await postControl(this.run, command);
      if (sent.error) {
        e.outcome.className = 'control-outcome tone-bad';
        setText(e.outcome, `${command} refused: ${sent.error}`);
        return;
      }
      const ack = await waitForAck(this.run, sent.id);
      if (this.model.closed) return;
      const done = ack.status === 'done';
      e.outcome.className = `control-outcome ${done ? 'tone-good' : 'tone-bad'}`;
      e.outcome.dataset.status = ack.status;
      setText(e.outcome, `${command} ${ack.status}${ack.detail ? ': ' + ack.detail : ''}`);
      if (done && ack.checkpoint) {
        e.download.replaceChildren(h('a', {href: checkpointUrl(this.run, ack.checkpoint), download: ack.checkpoint,
          testid: 'checkpoint-link', class: 'btn tone-accent', text: `Download ${ack.checkpoint}`}));
      }
    } finally {
      this.busy = false;
      if (this.model.status) this.updateControls(this.model.status);
    }
  }
}
