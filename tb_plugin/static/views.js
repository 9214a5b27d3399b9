// Pure DOM builders and formatters for the Health tab. No fetching, no timers, no globals.
//
// Builders return new elements; `set*`/`update*` functions change an existing element in place,
// so a poll never rebuilds what is on screen (no flicker, scroll and focus survive). Text always
// goes through textContent: run names, log lines and alert messages come from files.

/**
 * Create an element. `attrs` keys: `class`, `testid` (-> data-testid), `text`, `on<Event>`
 * (listener), `style` (object), anything else -> attribute.
 * @return {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'testid') el.dataset.testid = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'style') Object.assign(el.style, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2).toLowerCase(), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Set text only when it changed (avoids needless layout and keeps selections). */
/**
 * The href of an in-page route. The page has <base href="plugin/tbhealth/">, against which a bare
 * "#run=x" would resolve to another document; spelling out this document's path keeps it a
 * hash change.
 */
export function routeHref(hash) {
  return `${location.pathname}${location.search}#${hash}`;
}

export function setText(el, text) {
  const t = text === null || text === undefined ? '' : String(text);
  if (el.textContent !== t) el.textContent = t;
}

// ----------------------------------------------------------------------------- formatting

/** A number for display; the server sends NaN/Inf as strings, which are shown as they are. */
export function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return '—';
  if (typeof v !== 'number') return String(v);  // 'NaN', 'Infinity': a diverged run must show it
  if (!Number.isFinite(v)) return String(v);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

/**
 * A number to `digits` significant digits, in e-notation when tiny or huge (1.8e-19, never 0):
 * for learning rates and gradient norms, which span many decades.
 */
export function fmtSig(v, digits = 3) {
  if (typeof v !== 'number' || !Number.isFinite(v)) return fmtNum(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-4 || a >= 1e6)) return v.toExponential(digits - 1).replace(/\.?0+e/, 'e').replace('e+', 'e');
  return String(Number(v.toPrecision(digits)));
}

/** A fraction in [0, 1] as a percentage. */
export function fmtPct(v, digits = 1) {
  if (v === null || v === undefined) return '—';
  if (typeof v === 'string') return v;
  return `${(v * 100).toFixed(digits)} %`;
}

export function fmtDuration(s) {
  if (s === null || s === undefined || typeof s !== 'number' || !Number.isFinite(s)) return '—';
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60), ss = s % 60;
  const p2 = (n) => String(n).padStart(2, '0');
  if (d) return `${d}d ${hh}h ${p2(mm)}m`;
  if (hh) return `${hh}h ${p2(mm)}m ${p2(ss)}s`;
  if (mm) return `${mm}m ${p2(ss)}s`;
  return `${ss}s`;
}

export function fmtBytes(b) {
  if (b === null || b === undefined || !Number.isFinite(b)) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i += 1; }
  return `${b.toFixed(i && b < 10 ? 1 : 0)} ${units[i]}`;
}

/** One formatter for every clock time: toLocaleTimeString builds a new one per call (slow by the hundred). */
const CLOCK = new Intl.DateTimeFormat([], {hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false});

export function fmtClock(t) {
  if (!t) return '';
  return CLOCK.format(new Date(t * 1000));
}

export function fmtAgo(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '—';
  return seconds < 2 ? 'just now' : `${fmtDuration(seconds)} ago`;
}

// ----------------------------------------------------------------------------- small widgets

/** Colour class of a run state: green running, yellow paused, red failed, grey finished. */
export function stateTone(state) {
  switch (state) {
    case 'training': case 'starting': return 'good';
    case 'paused': case 'stopping': return 'warn';
    case 'failed': case 'unresponsive': return 'bad';
    default: return 'idle';
  }
}

export function badge(state, testid = 'state-badge') {
  const el = h('span', {class: 'badge', testid});
  setBadge(el, state);
  return el;
}

export function setBadge(el, state) {
  const s = state || 'unknown';
  setText(el, s);
  const cls = `badge tone-${stateTone(s)}`;
  if (el.className !== cls) el.className = cls;
  el.dataset.state = s;
}

/** A horizontal bar; `setBar` fills it. */
export function bar(testid, tone = 'accent') {
  return h('div', {class: `bar tone-${tone}`, testid, role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100},
      h('div', {class: 'bar-fill'}));
}

export function setBar(el, fraction, tone) {
  const f = typeof fraction === 'number' && Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
  const width = `${(f * 100).toFixed(1)}%`;
  const fill = el.firstChild;
  if (fill.style.width !== width) fill.style.width = width;
  el.setAttribute('aria-valuenow', String(Math.round(f * 100)));
  if (tone) {
    const cls = `bar tone-${tone}`;
    if (el.className !== cls) el.className = cls;
  }
}

/** A label/value pair inside the status grid; returns [wrapper, valueElement]. */
export function stat(label, testid) {
  const value = h('span', {class: 'stat-value', testid});
  return [h('div', {class: 'stat'}, h('span', {class: 'stat-label', text: label}), value), value];
}

// ----------------------------------------------------------------------------- overview

export const OVERVIEW_COLUMNS = ['', 'Run', 'State', 'Epoch', 'Progress', 'ETA', 'Alerts', 'Val loss', 'Val acc', 'Health', 'Updated'];

export function overviewTable() {
  return h('table', {class: 'runs', testid: 'runs-table'},
      h('thead', {}, h('tr', {}, OVERVIEW_COLUMNS.map((c) => h('th', {text: c})))),
      h('tbody'));
}

/**
 * A row for one run; `onOpen(run)` opens its page, `onSelect(run, checked)` follows its
 * compare checkbox. Fill it with `updateOverviewRow`.
 */
export function overviewRow(run, onOpen, onSelect) {
  const link = h('a', {href: routeHref(`run=${encodeURIComponent(run)}`), class: 'run-link', testid: 'run-link', text: run});
  const pick = h('input', {type: 'checkbox', class: 'run-pick', testid: 'run-select', 'aria-label': `Compare ${run}`,
    onChange: (e) => onSelect(run, e.target.checked)});
  const tr = h('tr', {class: 'run-row', testid: 'run-row', tabindex: 0, 'data-run': run},
      h('td', {class: 'pick'}, pick),
      h('td', {}, link),
      h('td', {}, badge(null)),
      h('td', {class: 'num', testid: 'run-epoch'}),
      h('td', {}, h('div', {class: 'row-progress'}, bar('run-progress'), h('span', {class: 'pct'}))),
      h('td', {class: 'num', testid: 'run-eta'}),
      h('td', {class: 'num', testid: 'run-alerts'}),
      h('td', {class: 'num', testid: 'run-val-loss'}),
      h('td', {class: 'num', testid: 'run-val-acc'}),
      h('td', {class: 'num', testid: 'run-health'}),
      h('td', {class: 'num muted', testid: 'run-updated'}));
  tr.addEventListener('click', (e) => { if (e.target !== link && e.target !== pick) onOpen(run); });
  tr.addEventListener('keydown', (e) => { if (e.key === 'Enter' && e.target !== pick) onOpen(run); });
  return tr;
}

/**
 * @param {HTMLElement} tr @param {Object} r a RunSummary @param {number} serverNow
 * @param {string[]} liveStates states that still have an ETA (GET config)
 */
export function updateOverviewRow(tr, r, serverNow, liveStates) {
  const cells = tr.children;
  setBadge(cells[2].firstChild, r.state);
  setText(cells[3], r.epoch === null ? '—' : `${r.epoch}/${r.total_epochs ?? '?'}`);
  setBar(cells[4].firstChild.firstChild, r.progress, stateTone(r.state) === 'bad' ? 'bad' : 'accent');
  setText(cells[4].firstChild.lastChild, r.progress === null ? '' : `${Math.floor(r.progress * 100)} %`);
  setText(cells[5], liveStates.includes(r.state) ? fmtDuration(r.eta_s) : '—');
  const n = r.alerts_active || 0;
  setText(cells[6], n ? `⚠ ${n}` : '0');
  cells[6].className = `num${n ? ' has-alerts' : ''}`;
  setText(cells[7], fmtNum(r.val_loss));
  setText(cells[8], fmtPct(r.val_acc));
  setText(cells[9], r.health_score === null || r.health_score === undefined ? '—' : Math.round(r.health_score));
  setText(cells[10], r.updated_at ? fmtAgo(serverNow - r.updated_at) : '—');
}

// ----------------------------------------------------------------------------- dialogs

/**
 * An in-page confirmation dialog (not window.confirm: scriptable, styleable, non-blocking).
 * @return {Promise<boolean>} true when confirmed.
 */
export function confirmDialog(root, {title, body, confirmText, tone = 'bad', testid = 'confirm'}) {
  return new Promise((resolve) => {
    const close = (answer) => { overlay.remove(); document.removeEventListener('keydown', onKey); resolve(answer); };
    const onKey = (e) => { if (e.key === 'Escape') close(false); };
    const yes = h('button', {class: `btn tone-${tone}`, testid: `${testid}-yes`, text: confirmText, onClick: () => close(true)});
    const no = h('button', {class: 'btn', testid: `${testid}-cancel`, text: 'Cancel', onClick: () => close(false)});
    const overlay = h('div', {class: 'overlay', testid: `${testid}-overlay`},
        h('div', {class: 'dialog', role: 'dialog', 'aria-modal': 'true', 'aria-label': title, testid},
            h('h3', {text: title}), h('p', {text: body}), h('div', {class: 'dialog-buttons'}, no, yes)));
    overlay.addEventListener('click', (e) => { if (e.target === overlay) close(false); });
    document.addEventListener('keydown', onKey);
    root.append(overlay);
    no.focus();
  });
}
