// Entry point of the Health tab. TensorBoard loads this module in an iframe and calls render().
//
// Routing lives in the iframe's own URL hash (`#run=NAME` opens a run, `#compare=A,B` compares
// runs, empty shows the overview), so the browser's back button and reloads work without touching
// TensorBoard's own URL. The page polls every POLL_MS; a new poll starts only after the previous
// one finished.

import {getConfig} from './model.js';
import {h} from './views.js';
import {Overview} from './overview.js';
import {RunPage} from './runpage.js';
import {ComparePage} from './compare.js';

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

/** What the hash asks for: {run}, {compare: [runs]} or {} (the overview). */
function currentRoute() {
  const m = /^#(run|compare)=(.+)$/.exec(location.hash);
  if (!m) return {};
  try {
    if (m[1] === 'run') return {run: decodeURIComponent(m[2])};
    return {compare: m[2].split(',').map(decodeURIComponent).filter(Boolean)};
  } catch (e) {
    return {};
  }
}

function route() {
  const where = currentRoute();
  app.generation += 1;
  clearTimeout(app.timer);
  if (app.page && app.page.destroy) app.page.destroy();
  if (where.run !== undefined) app.page = new RunPage(where.run, app.config, chartTheme);
  else if (where.compare) app.page = new ComparePage(where.compare, app.config, chartTheme);
  else app.page = new Overview(openRun, openComparison, app.config);
  app.root.replaceChildren(app.page.el);
  window.scrollTo(0, 0);
  loop(app.generation);
}

function openRun(run) {
  location.hash = `#run=${encodeURIComponent(run)}`;
}

function openComparison(runs) {
  location.hash = `#compare=${runs.map(encodeURIComponent).join(',')}`;
}

/** Poll the current page until the route changes (the generation moves on). */
async function loop(generation) {
  if (generation !== app.generation) return;
  if (app.config.fallback) {  // GET config failed at start: the page lacks states and metric keys
    const config = await getConfig();
    if (!config.fallback && generation === app.generation) {
      app.config = config;
      route();  // rebuild the page with them
      return;
    }
  }
  try {
    await app.page.poll();
  } catch (e) {
    console.error('tbhealth: update failed', e);  // a rendering bug must not stop the polling
  }
  if (generation !== app.generation) return;
  app.timer = setTimeout(() => loop(generation), POLL_MS);
}
