// Entry point of the Health tab. TensorBoard loads this module in an iframe and calls render().
//
// Routing lives in the iframe's own URL hash (`#run=NAME` opens a run, empty shows the overview),
// so the browser's back button and reloads work without touching TensorBoard's own URL. The page
// polls every POLL_MS; a new poll starts only after the previous one finished.

import {getJson, getConfig, lastError} from './model.js';
import {h, setText, overviewTable, overviewRow, updateOverviewRow} from './views.js';
import {RunPage} from './runpage.js';

const POLL_MS = 2000;

/** Current page state: one of the overview or a RunPage. */
const app = {root: null, page: null, timer: null, ticker: null, generation: 0, config: null};

export async function render() {
  const link = h('link', {rel: 'stylesheet', href: 'style.css'});
  document.head.append(link, h('meta', {name: 'viewport', content: 'width=device-width, initial-scale=1'}));
  app.root = h('div', {class: 'tbhealth', testid: 'tbhealth-root'});
  document.body.append(app.root);
  setupTheme();
  app.config = await getConfig();
  window.addEventListener('hashchange', route);
  app.ticker = setInterval(() => { if (app.page && app.page.tick) app.page.tick(); }, 1000);
  route();
}

// ------------------------------------------------------------------------------ theme

/** Dark when TensorBoard's page is dark (body.dark-mode), else when the OS prefers dark. */
function setupTheme() {
  const media = window.matchMedia('(prefers-color-scheme: dark)');
  let parentBody = null;
  try {
    parentBody = window.parent !== window ? window.parent.document.body : null;
  } catch (e) {
    parentBody = null;  // cross-origin parent: fall back to the OS preference
  }
  const apply = () => {
    const dark = parentBody ? parentBody.classList.contains('dark-mode') : media.matches;
    document.documentElement.dataset.theme = dark ? 'dark' : 'light';
  };
  apply();
  media.addEventListener('change', apply);
  if (parentBody) new MutationObserver(apply).observe(parentBody, {attributes: true, attributeFilter: ['class']});
}

/** Chart colours from the CSS variables of the current theme. */
export function chartTheme() {
  const css = getComputedStyle(document.documentElement);
  const v = (name) => css.getPropertyValue(name).trim();
  return {fg: v('--fg'), muted: v('--muted'), grid: v('--grid'), bg: v('--bg')};
}

// ------------------------------------------------------------------------------ routing

function currentRun() {
  const m = /^#run=(.+)$/.exec(location.hash);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch (e) {
    return null;
  }
}

function route() {
  const run = currentRun();
  app.generation += 1;
  clearTimeout(app.timer);
  if (app.page && app.page.destroy) app.page.destroy();
  app.page = run === null ? new Overview(openRun) : new RunPage(run, app.config, chartTheme);
  app.root.replaceChildren(app.page.el);
  window.scrollTo(0, 0);
  loop(app.generation);
}

function openRun(run) {
  location.hash = `#run=${encodeURIComponent(run)}`;
}

/** Poll the current page until the route changes (the generation moves on). */
async function loop(generation) {
  if (generation !== app.generation) return;
  try {
    await app.page.poll();
  } catch (e) {
    console.error('tbhealth: update failed', e);  // a rendering bug must not stop the polling
  }
  if (generation !== app.generation) return;
  app.timer = setTimeout(() => loop(generation), POLL_MS);
}

// ------------------------------------------------------------------------------ overview

class Overview {
  constructor(onOpen) {
    this.onOpen = onOpen;
    this.closed = false;
    this.table = overviewTable();
    this.rows = new Map();
    this.status = h('div', {class: 'conn muted', testid: 'overview-connection'});
    this.empty = h('div', {class: 'empty', testid: 'overview-empty', hidden: true});
    this.count = h('span', {class: 'muted', testid: 'run-count'});
    this.el = h('div', {class: 'overview', testid: 'overview'},
        h('div', {class: 'overview-header'}, h('h2', {text: 'Training runs'}), this.count, this.status),
        this.empty, this.table);
  }

  destroy() { this.closed = true; }

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
        tr = overviewRow(r.run, this.onOpen);
        this.rows.set(r.run, tr);
      }
      updateOverviewRow(tr, r, serverNow);
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    for (const [name, tr] of this.rows) {
      if (!seen.has(name)) { tr.remove(); this.rows.delete(name); }
    }
  }
}
