// Drives the chain explorer in headless Chromium with puppeteer-core (explorer.rs runs it).
// Usage: node explorer_driver.js '<config JSON>'; config: mode (page | e2e | bench),
// modules (node_modules with puppeteer-core), chromium, url (the page), and per mode
// the fields read below. Progress goes to stderr; the last stdout line is the result as
// JSON. A failed check throws: exit code 1 and the reason on stderr.
'use strict';
const path = require('path');

const cfg = JSON.parse(process.argv[2]);
const puppeteer = require(path.join(cfg.modules, 'puppeteer-core'));
const WAIT = { timeout: 20000 };

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.error(`ok: ${what}`);
}

async function launch() {
  const args = ['--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check',
    '--window-size=1280,900'];
  // Chromium refuses to run as root inside its sandbox.
  if (process.getuid && process.getuid() === 0) args.push('--no-sandbox');
  return puppeteer.launch({ executablePath: cfg.chromium, headless: true, args,
    defaultViewport: { width: 1280, height: 900 } });
}

// Every console error and page error, except the browser's own line for an HTTP error
// answer (the tests provoke 404 and 503 on purpose).
function watch(page, problems) {
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) {
      problems.push(`console: ${m.text()}`);
    }
  });
}

const listLoaded = () => document.getElementById('list-view').dataset.state === 'loaded'
  && !document.getElementById('list-view').hasAttribute('aria-busy');
const rows = (page) => page.$$eval('#txn-rows tr', (trs) => trs.map((tr) => ({
  txn: tr.dataset.txn, user: tr.children[1].textContent, cells: [...tr.children].map((c) => c.textContent) })));
const treeItems = (page) => page.$$eval('#tree [role=treeitem]', (items) => items.map((i) => ({
  kind: i.dataset.kind, id: i.dataset.id, decision: i.dataset.decision,
  level: Number(i.getAttribute('aria-level')),
  shown: i.offsetParent !== null,
  events: [...i.querySelectorAll(':scope > .events > .event')].map((e) => ({
    kind: e.dataset.kind, decision: e.dataset.decision, text: e.textContent })) })));
const active = (page) => page.evaluate(() => {
  const a = document.activeElement;
  return { tag: a.tagName, id: a.id, txn: a.dataset ? a.dataset.txn || null : null,
    kind: a.dataset ? a.dataset.kind || null : null, itemId: a.dataset ? a.dataset.id || null : null };
});

async function waitTxn(page, state) {
  await page.waitForFunction((s) => {
    const v = document.getElementById('txn-view');
    return !v.hidden && v.dataset.state === s && !v.hasAttribute('aria-busy');
  }, WAIT, state);
}

// Searches by typing into the search box (focused with `/`), then waits for the list.
async function search(page, text) {
  await page.keyboard.press('/');
  const a = await active(page);
  check(a.id === 'search', '/ focuses the search box');
  await page.keyboard.down('Control');
  await page.keyboard.press('KeyA');
  await page.keyboard.up('Control');
  await page.keyboard.press('Backspace');
  if (text) await page.keyboard.type(text);
  await page.keyboard.press('Enter');
  await page.waitForFunction((q) => {
    const v = document.getElementById('list-view');
    const count = document.getElementById('list-count').textContent;
    return !v.hasAttribute('aria-busy') && (v.dataset.state === 'error'
      || (v.dataset.state === 'loaded' && (q === '' ? !count.includes('matching') : count.includes(`"${q}"`) || count.includes('No transaction matches'))));
  }, WAIT, text);
}

// Tab from the search box to the first transaction link, then Enter opens it.
async function openFirstByKeyboard(page) {
  for (let i = 0; i < 6; i++) {
    await page.keyboard.press('Tab');
    const a = await active(page);
    if (a.txn) {
      await page.keyboard.press('Enter');
      await waitTxn(page, 'loaded');
      return a.txn;
    }
  }
  throw new Error('check failed: Tab reaches a transaction link');
}

// WCAG contrast of every visible text element against its effective background, in the
// page's current colour scheme: the lowest ratio and where it is.
async function lowestContrast(page) {
  return page.evaluate(() => {
    const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => { const x = v / 255; return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; };
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
      }
      return rgb(getComputedStyle(document.documentElement).backgroundColor).slice(0, 3);
    };
    let lowest = { ratio: 99, where: '' };
    for (const el of document.querySelectorAll('body *')) {
      const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim() !== '');
      if (!own || el.offsetParent === null) continue;
      const a = lum(rgb(getComputedStyle(el).color).slice(0, 3));
      const b = lum(background(el));
      const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
      if (ratio < lowest.ratio) lowest = { ratio, where: `${el.tagName}.${el.className}: ${el.textContent.slice(0, 40)}` };
    }
    return lowest;
  });
}

async function contrastBothSchemes(page, what) {
  for (const scheme of ['light', 'dark']) {
    await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: scheme }]);
    const low = await lowestContrast(page);
    check(low.ratio >= 4.5, `${what}, ${scheme}: every text is at least 4.5:1 (lowest ${low.ratio.toFixed(1)}:1 at ${low.where})`);
  }
}

async function pageMode(browser) {
  const problems = [];
  const page = await browser.newPage();
  watch(page, problems);
  const res = await page.goto(`${cfg.url}/explorer`, { waitUntil: 'load' });
  const h = res.headers();
  check(res.status() === 200, 'the page answers 200');
  check((h['content-security-policy'] || '').includes("frame-ancestors 'none'"), 'the page has a strict CSP');
  check(h['x-content-type-options'] === 'nosniff', 'nosniff');
  check(h['referrer-policy'] === 'no-referrer', 'no-referrer');
  await page.waitForFunction(listLoaded, WAIT);
  let list = await rows(page);
  check(list.length === cfg.expect_rows, `the list renders ${cfg.expect_rows} rows (got ${list.length})`);
  check(list[0].txn === cfg.newest, `the newest transaction is first (${list[0].txn})`);

  // The XSS payload is text.
  const xss = list.find((r) => r.txn === cfg.xss_txn);
  check(xss && xss.user === cfg.xss_sub, 'the <script> user shows as text');
  check(await page.evaluate(() => window.__xss === undefined), 'the payload did not run');
  check(await page.$$eval('#txn-rows script, #txn-rows img, #tree script', (n) => n.length) === 0, 'no element from data');

  // Search filters.
  await search(page, 'bob');
  list = await rows(page);
  check(list.length === 1 && list[0].txn === cfg.refused_txn, `searching "bob" leaves the refused transaction (${list.map((r) => r.txn)})`);
  await search(page, cfg.tree_txn);
  list = await rows(page);
  check(list.length === 1 && list[0].txn === cfg.tree_txn, 'searching a txn id finds it');

  // Tab, Enter: the tree.
  const opened = await openFirstByKeyboard(page);
  check(opened === cfg.tree_txn, 'Enter opens the focused transaction');
  check(await page.evaluate(() => location.hash) === `#txn=${cfg.tree_txn}`, 'the deep link is in the address');
  const items = await treeItems(page);
  check(items.map((i) => i.kind).join(' ') === 'user workload workload workload service', `the tree is user -> 3 workloads -> service (${items.map((i) => i.kind)})`);
  check(items.map((i) => i.level).join('') === '12345', 'one level per hop');
  check(items.slice(1).every((i) => i.decision === 'allow'), 'every hop is allowed');
  check(items[1].id === cfg.gateway && items[2].id === cfg.planner && items[3].id === cfg.sub_agent && items[4].id === cfg.tool, 'the hops are gateway, planner, sub-agent, tool');
  const text = await page.$eval('#tree', (t) => t.textContent);
  for (const want of ['grant', 'replacement', 'spawn', 'verification', 'lease-7f3a', 'GET /docs/42', '180 \u00b5s', 'docs.read docs.summarize', '300 s', '+41 ms']) {
    check(text.includes(want), `the tree shows ${want}`);
  }
  check(items[3].events.map((e) => e.kind).join(' ') === 'spawn replacement', 'the sub-agent has its spawn and its replacement');

  // The tree's keys.
  let a = await active(page);
  check(a.kind === 'user', 'opening focuses the tree');
  await page.keyboard.press('ArrowDown');
  a = await active(page);
  check(a.itemId === cfg.gateway, 'ArrowDown moves to the gateway');
  await page.keyboard.press('ArrowLeft');
  let shown = (await treeItems(page)).filter((i) => i.shown).length;
  check(shown === 2, `ArrowLeft folds the gateway (${shown} shown)`);
  await page.keyboard.press('ArrowRight');
  shown = (await treeItems(page)).filter((i) => i.shown).length;
  check(shown === 5, 'ArrowRight unfolds it');
  await page.keyboard.press('End');
  a = await active(page);
  check(a.itemId === cfg.tool, 'End moves to the tool');
  await page.keyboard.press('ArrowLeft');
  a = await active(page);
  check(a.itemId === cfg.sub_agent, 'ArrowLeft on a leaf moves to its parent');
  const focusRing = await page.evaluate(() => getComputedStyle(document.activeElement.querySelector('.node-head')).outlineStyle);
  check(focusRing === 'solid', 'the focused tree item has a visible outline');
  await contrastBothSchemes(page, 'the tree');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await page.screenshot({ path: path.join(cfg.screenshots, 'page-tree-dark.png'), fullPage: true });
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);
  const treeShot = path.join(cfg.screenshots, 'page-tree.png');
  await page.screenshot({ path: treeShot, fullPage: true });

  // Escape returns to the list, on the link it opened.
  await page.keyboard.press('Escape');
  await page.waitForFunction(() => !document.getElementById('list-view').hidden, WAIT);
  check(await page.evaluate(() => location.hash) === '', 'Escape leaves the deep link');
  a = await active(page);
  check(a.txn === cfg.tree_txn, 'the focus is back on the transaction it opened');

  // A deep link to the refused transaction, in a fresh page.
  const deep = await browser.newPage();
  watch(deep, problems);
  await deep.goto(`${cfg.url}/explorer#txn=${encodeURIComponent(cfg.refused_txn)}`, { waitUntil: 'load' });
  await waitTxn(deep, 'loaded');
  const refusedItems = await treeItems(deep);
  check(refusedItems.map((i) => i.decision).join(' ') === 'none allow deny', `the refused hop is denied (${refusedItems.map((i) => i.decision)})`);
  const refusal = refusedItems[2].events[0];
  check(refusal.kind === 'refusal' && refusal.text.includes('invalid_scope') && refusal.text.includes('is not allowed for this caller'), 'the refusal shows its error and reason');
  await deep.screenshot({ path: path.join(cfg.screenshots, 'page-refusal.png'), fullPage: true });

  // API errors show.
  await deep.evaluate(() => { location.hash = '#txn=no-such-txn'; });
  await waitTxn(deep, 'error');
  const notFound = await deep.$eval('#txn-error', (e) => (e.hidden ? '' : e.textContent));
  check(notFound.includes('not_found') && notFound.includes('HTTP 404'), `an unknown txn shows the API's error (${notFound})`);
  await deep.keyboard.press('Escape');
  await deep.waitForFunction(listLoaded, WAIT);
  await search(deep, 'fail');
  const listError = await deep.$eval('#list-error', (e) => (e.hidden ? '' : e.textContent));
  check(listError.includes('store_unavailable') && listError.includes('HTTP 503'), `a failing list shows the API's error (${listError})`);
  await contrastBothSchemes(deep, 'an error');
  await deep.close();

  // A live change appears after a poll.
  await search(page, '');
  const added = await (await fetch(`${cfg.url}/__test/live`, { method: 'POST' })).json();
  await page.waitForFunction((txn) => !!document.querySelector(`#txn-rows tr[data-txn="${txn}"]`), { timeout: 15000 }, added.txn);
  list = await rows(page);
  check(list[0].txn === added.txn, `the live transaction ${added.txn} appears first after a poll`);
  const live = await page.$eval('#live', (e) => e.textContent);
  check(live.includes('changed'), `the live status says so (${live})`);
  await contrastBothSchemes(page, 'the list');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);
  const listShot = path.join(cfg.screenshots, 'page-list.png');
  await page.screenshot({ path: listShot, fullPage: false });

  check(problems.length === 0, `no script or CSP errors (${problems.join('; ')})`);
  return { screenshots: [listShot, treeShot, path.join(cfg.screenshots, 'page-tree-dark.png'), path.join(cfg.screenshots, 'page-refusal.png')] };
}

async function e2eMode(browser) {
  const problems = [];
  const page = await browser.newPage();
  watch(page, problems);
  const res = await page.goto(cfg.url, { waitUntil: 'load' });
  check(res.status() === 200, `${cfg.url} answers 200`);
  await page.waitForFunction(listLoaded, WAIT);
  const all = await rows(page);
  const listShot = path.join(cfg.screenshots, 'demo-list.png');
  await page.screenshot({ path: listShot });
  await search(page, cfg.txn);
  const found = await rows(page);
  check(found.length === 1 && found[0].txn === cfg.txn, `the demo's transaction is listed (${found.map((r) => r.txn)})`);
  const opened = await openFirstByKeyboard(page);
  // Records that arrive after the page opened (a service's verification) come with the
  // next poll: wait a little for the whole chain before reading it.
  await page.waitForFunction((n) => document.querySelectorAll('#tree [role=treeitem]').length >= n,
    { timeout: 10000 }, cfg.min_items || 1).catch(() => {});
  const items = await treeItems(page);
  const treeShot = path.join(cfg.screenshots, 'demo-tree.png');
  await page.screenshot({ path: treeShot, fullPage: true });
  check(problems.length === 0, `no script or CSP errors (${problems.join('; ')})`);
  return { listed: all.length, row: found[0], opened, items, screenshots: [listShot, treeShot] };
}

function stats(values) {
  const v = [...values].sort((x, y) => x - y);
  const at = (p) => v[Math.min(v.length - 1, Math.floor(p * v.length))];
  return { runs: v.length, min: v[0], median: at(0.5), p90: at(0.9), max: v[v.length - 1] };
}

async function benchMode(browser) {
  const list = [];
  const tree = [];
  const search = [];
  const listApi = [];
  const searchApi = [];
  // How long the API took to answer (Resource Timing), to tell it from the page's share.
  const apiMs = (page, nth) => page.evaluate((n) => performance.getEntriesByType('resource')
    .filter((e) => e.name.includes('/explorer/api/txns?'))[n].duration, nth);
  for (let i = 0; i < cfg.runs; i++) {
    const context = await browser.createBrowserContext();
    const page = await context.newPage();
    await page.setCacheEnabled(false);
    await page.goto(cfg.url, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => performance.getEntriesByName('writ-list-rendered').length > 0, WAIT);
    const rendered = await page.$$eval('#txn-rows tr', (r) => r.length);
    if (rendered !== cfg.expect_rows) throw new Error(`rendered ${rendered} rows`);
    list.push(await page.evaluate(() => performance.getEntriesByName('writ-list-rendered')[0].startTime));
    listApi.push(await apiMs(page, 0));
    tree.push(await page.evaluate(async (txn) => {
      const t0 = performance.now();
      location.hash = `#txn=${encodeURIComponent(txn)}`;
      while (performance.getEntriesByName('writ-tree-rendered').length === 0) {
        await new Promise((r) => setTimeout(r, 1));
      }
      return performance.getEntriesByName('writ-tree-rendered')[0].startTime - t0;
    }, cfg.txn));
    search.push(await page.evaluate(async (q) => {
      history.pushState(null, '', location.pathname);
      document.getElementById('txn-view').hidden = true;
      document.getElementById('list-view').hidden = false;
      performance.clearMarks('writ-list-rendered');
      const t0 = performance.now();
      document.getElementById('search').value = q;
      document.getElementById('search-form').requestSubmit();
      while (performance.getEntriesByName('writ-list-rendered').length === 0) {
        await new Promise((r) => setTimeout(r, 1));
      }
      return performance.getEntriesByName('writ-list-rendered')[0].startTime - t0;
    }, cfg.query));
    searchApi.push(await apiMs(page, 1));
    await context.close();
  }
  return { list_ms: stats(list), list_api_ms: stats(listApi), tree_ms: stats(tree),
    search_ms: stats(search), search_api_ms: stats(searchApi) };
}

(async () => {
  const browser = await launch();
  try {
    const modes = { page: pageMode, e2e: e2eMode, bench: benchMode };
    if (!modes[cfg.mode]) throw new Error(`unknown mode ${cfg.mode}`);
    const result = await modes[cfg.mode](browser);
    result.browser = await browser.version();
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
