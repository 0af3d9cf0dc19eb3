// Writ chain explorer. Data from the explorer API is rendered only as text nodes
// (textContent, Element.append of strings), never parsed as HTML.
'use strict';
(() => {
  const API = '/explorer/api';
  const POLL_MS = 2000;
  const LIST_LIMIT = 100;
  const SEARCH_DELAY_MS = 250;
  const $ = (id) => document.getElementById(id);

  const state = {
    cursor: null, // highest audit sequence seen
    q: '',
    current: null, // the open transaction
    lastOpened: null,
    listSeq: 0,
    txnSeq: 0,
    listDirty: false,
    searchTimer: null,
    ids: 0,
  };

  // ---- DOM helpers -------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = String(v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) {
      if (c !== null && c !== undefined) e.append(c);
    }
    return e;
  }
  const str = (v) => (typeof v === 'string' ? v : v === undefined || v === null ? '' : String(v));
  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);

  function showError(node, text) {
    node.textContent = text;
    node.hidden = false;
  }
  function hideError(node) {
    node.textContent = '';
    node.hidden = true;
  }

  function fmtTime(ms) {
    const n = num(ms);
    if (n === null) return '-';
    try {
      return new Date(n).toISOString().replace('T', ' ').replace('Z', '');
    } catch (_) {
      return '-';
    }
  }
  function fmtDuration(ms) {
    const n = num(ms);
    if (n === null || n < 0) return '-';
    if (n < 1000) return `${Math.round(n)} ms`;
    if (n < 60000) return `${(n / 1000).toFixed(2)} s`;
    return `${(n / 60000).toFixed(1)} min`;
  }
  function fmtClock(date) {
    return date.toISOString().slice(11, 19);
  }

  // ---- API ---------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, description) {
      super(`${code}: ${description}`);
      this.status = status;
      this.code = code;
      this.description = description;
    }
  }

  async function api(path) {
    let res;
    try {
      res = await fetch(API + path, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, 'unreachable', `the explorer API did not answer (${str(e && e.message)})`);
    }
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      body = null;
    }
    if (!res.ok) {
      const code = body && typeof body.error === 'string' ? body.error : `http_${res.status}`;
      const description = body && typeof body.error_description === 'string'
        ? body.error_description
        : (res.statusText || 'no description');
      throw new ApiError(res.status, code, description);
    }
    if (body === null || typeof body !== 'object') {
      throw new ApiError(res.status, 'bad_response', 'the explorer API did not answer with a JSON object');
    }
    return body;
  }

  function errorText(e) {
    if (e instanceof ApiError) {
      return `${e.code}: ${e.description}${e.status ? ` (HTTP ${e.status})` : ''}`;
    }
    return str(e && e.message ? e.message : e);
  }

  function seeCursor(cursor) {
    const n = num(cursor);
    if (n !== null && (state.cursor === null || n > state.cursor)) state.cursor = n;
  }

  // ---- the list ----------------------------------------------------------
  async function loadList() {
    const params = new URLSearchParams({ limit: String(LIST_LIMIT) });
    if (state.q) params.set('q', state.q);
    const seq = ++state.listSeq;
    const view = $('list-view');
    view.setAttribute('aria-busy', 'true');
    try {
      const data = await api(`/txns?${params}`);
      if (seq !== state.listSeq) return;
      hideError($('list-error'));
      seeCursor(data.cursor);
      state.listDirty = false;
      renderList(Array.isArray(data.txns) ? data.txns : []);
    } catch (e) {
      if (seq !== state.listSeq) return;
      showError($('list-error'), `Could not load transactions: ${errorText(e)}`);
      view.dataset.state = 'error';
    } finally {
      if (seq === state.listSeq) view.removeAttribute('aria-busy');
    }
  }

  function renderList(txns) {
    const body = $('txn-rows');
    const focused = document.activeElement && document.activeElement.closest
      ? document.activeElement.closest('#txn-rows a.txn-link') : null;
    const refocus = focused ? focused.dataset.txn : null;
    const rows = txns.filter((t) => t && typeof t === 'object').map((t) => {
      const txn = str(t.txn);
      const denied = t.denied === true;
      const started = num(t.started_ms);
      const last = num(t.last_ms);
      const workloads = Array.isArray(t.workloads) ? t.workloads.map(str) : [];
      const link = el('a', { href: `#txn=${encodeURIComponent(txn)}`, class: 'txn-link mono', 'data-txn': txn }, txn);
      return el('tr', { 'data-txn': txn, class: denied ? 'denied' : null },
        el('td', {}, link),
        el('td', { class: 'user' }, str(t.sub)),
        el('td', { class: 'mono nowrap' }, fmtTime(started)),
        el('td', { class: 'nowrap' }, started !== null && last !== null ? fmtDuration(last - started) : '-'),
        el('td', { class: 'workloads' }, ...workloads.map((w) => el('span', { class: 'mono workload' }, w))),
        el('td', { class: 'num' }, str(num(t.grants) ?? '-')),
        el('td', { class: 'num' }, str(num(t.refusals) ?? '-')),
        el('td', { class: 'num' }, str(num(t.verifications) ?? '-')),
        el('td', { class: 'num' }, str(num(t.spawns) ?? '-')),
        el('td', {}, badge(denied ? 'deny' : 'allow', denied ? 'denied' : 'allowed')));
    });
    body.replaceChildren(...rows);
    const n = rows.length;
    $('list-count').textContent = n === 0
      ? (state.q ? `No transaction matches "${state.q}".` : 'No transactions yet.')
      : `${n} transaction${n === 1 ? '' : 's'}${state.q ? ` matching "${state.q}"` : ''}, newest activity first${n >= LIST_LIMIT ? ` (the ${LIST_LIMIT} most recent: search to narrow)` : ''}.`;
    const view = $('list-view');
    view.dataset.state = 'loaded';
    view.dataset.rows = String(n);
    if (refocus !== null) {
      const again = [...body.querySelectorAll('a.txn-link')].find((a) => a.dataset.txn === refocus);
      if (again) again.focus();
    }
    performance.mark('writ-list-rendered');
  }

  function badge(decision, text) {
    const d = decision === 'deny' ? 'deny' : decision === 'allow' ? 'allow' : 'none';
    return el('span', { class: `badge badge-${d}` }, text || d);
  }

  // ---- one transaction ---------------------------------------------------
  async function openTxn(txn, refresh) {
    const view = $('txn-view');
    state.current = txn;
    state.lastOpened = txn;
    $('list-view').hidden = true;
    view.hidden = false;
    view.dataset.txn = txn;
    $('txn-title').textContent = `Transaction ${txn}`;
    document.title = `${txn} - Writ chain explorer`;
    if (!refresh) {
      view.dataset.state = 'loading';
      hideError($('txn-error'));
      $('txn-meta').replaceChildren();
      $('tree').replaceChildren();
    }
    const seq = ++state.txnSeq;
    view.setAttribute('aria-busy', 'true');
    try {
      const data = await api(`/txns/${encodeURIComponent(txn)}`);
      if (seq !== state.txnSeq || state.current !== txn) return;
      hideError($('txn-error'));
      renderTxn(data, refresh);
    } catch (e) {
      if (seq !== state.txnSeq || state.current !== txn) return;
      if (!refresh) {
        $('tree').replaceChildren();
        view.dataset.state = 'error';
      }
      showError($('txn-error'), `Could not load transaction ${txn}: ${errorText(e)}`);
      if (!refresh) $('txn-title').focus();
    } finally {
      if (seq === state.txnSeq) view.removeAttribute('aria-busy');
    }
  }

  function renderTxn(data, refresh) {
    const started = num(data.started_ms);
    const last = num(data.last_ms);
    const meta = [
      ['User', str(data.sub)],
      ['Started (UTC)', fmtTime(started)],
      ['Last activity (UTC)', fmtTime(last)],
      ['Took', started !== null && last !== null ? fmtDuration(last - started) : '-'],
    ];
    $('txn-meta').replaceChildren(...meta.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));

    const tree = $('tree');
    // A refresh keeps what the user folded and where the focus was.
    const folded = new Set();
    let focusPath = null;
    if (refresh) {
      for (const item of tree.querySelectorAll('[role=treeitem][aria-expanded=false]')) folded.add(item.dataset.path);
      const f = document.activeElement && document.activeElement.closest
        ? document.activeElement.closest('#tree [role=treeitem]') : null;
      if (f) focusPath = f.dataset.path;
    }
    const root = data.root && typeof data.root === 'object' ? data.root : null;
    const items = root ? [renderNode(root, 1, 1, 1, '', started, folded)] : [];
    tree.replaceChildren(...items);
    const all = treeItems();
    const target = (focusPath !== null && all.find((i) => i.dataset.path === focusPath)) || all[0];
    if (target) {
      target.tabIndex = 0;
      if (!refresh || focusPath !== null) target.focus();
    } else if (!refresh) {
      $('txn-title').focus();
    }
    $('txn-view').dataset.state = 'loaded';
    performance.mark('writ-tree-rendered');
  }

  const KIND_LABEL = { user: 'user', workload: 'workload', service: 'service' };

  function nodeDecision(events) {
    if (events.length === 0) return 'none';
    return events.some((e) => e && e.decision === 'deny') ? 'deny' : 'allow';
  }

  function renderNode(node, level, pos, size, parentPath, txnStart, folded) {
    const kind = Object.prototype.hasOwnProperty.call(KIND_LABEL, node.kind) ? node.kind : 'other';
    const id = str(node.id);
    const path = `${parentPath}/${encodeURIComponent(id)}#${pos}`;
    const events = Array.isArray(node.events) ? node.events.filter((e) => e && typeof e === 'object') : [];
    const children = Array.isArray(node.children) ? node.children.filter((c) => c && typeof c === 'object') : [];
    const decision = nodeDecision(events);
    const n = ++state.ids;
    const labelId = `node-${n}`;
    const eventsId = `events-${n}`;
    const item = el('li', {
      role: 'treeitem',
      tabindex: '-1',
      'aria-level': level,
      'aria-posinset': pos,
      'aria-setsize': size,
      'aria-labelledby': labelId,
      'aria-describedby': events.length ? eventsId : null,
      'data-kind': kind,
      'data-id': id,
      'data-decision': decision,
      'data-path': path,
      class: `node node-${kind}`,
    });
    const expandable = children.length > 0;
    if (expandable) item.setAttribute('aria-expanded', folded.has(path) ? 'false' : 'true');
    const twisty = el('span', { class: expandable ? 'twisty' : 'twisty leaf', 'aria-hidden': 'true' }, expandable ? '' : '');
    const name = kind === 'user' && id.startsWith('user:') ? id.slice(5) : id;
    const head = el('div', { class: 'node-head' },
      twisty,
      el('span', { id: labelId, class: 'node-label' },
        el('span', { class: `kind kind-${kind}` }, kind === 'other' ? str(node.kind) || 'node' : KIND_LABEL[kind]),
        ' ',
        el('span', { class: 'node-id mono' }, name),
        decision === 'none' ? null : ' ',
        decision === 'none' ? null : badge(decision)));
    item.append(head);
    if (events.length) {
      item.append(el('div', { id: eventsId, class: 'events' }, ...events.map((e) => renderEvent(e, txnStart))));
    }
    if (expandable) {
      const group = el('ul', { role: 'group' },
        ...children.map((c, i) => renderNode(c, level + 1, i + 1, children.length, path, txnStart, folded)));
      group.hidden = folded.has(path);
      item.append(group);
    }
    return item;
  }

  const EVENT_FIELDS = [
    ['scope', 'scope'],
    ['caller', 'caller'],
    ['service', 'service'],
    ['route', 'route'],
    ['lease', 'lease'],
    ['parent', 'parent'],
    ['error', 'error'],
    ['reason', 'reason'],
    ['traceparent', 'traceparent'],
  ];

  function renderEvent(ev, txnStart) {
    const at = num(ev.at_ms);
    const decision = ev.decision === 'deny' ? 'deny' : ev.decision === 'allow' ? 'allow' : 'none';
    const fields = [];
    for (const [key, label] of EVENT_FIELDS) {
      if (ev[key] === undefined || ev[key] === null) continue;
      fields.push(el('dt', {}, label), el('dd', { class: key === 'reason' ? null : 'mono' }, str(ev[key])));
    }
    const latency = num(ev.latency_us);
    if (latency !== null) fields.push(el('dt', {}, 'latency'), el('dd', {}, `${latency} \u00b5s`));
    const expires = num(ev.expires_in);
    if (expires !== null) fields.push(el('dt', {}, 'expires in'), el('dd', {}, `${expires} s`));
    const offset = at !== null && txnStart !== null ? `+${fmtDuration(at - txnStart)}` : '';
    return el('div', { class: `event event-${decision}`, 'data-kind': str(ev.kind), 'data-decision': decision },
      el('div', { class: 'event-head' },
        el('span', { class: 'event-kind' }, str(ev.kind) || 'event'),
        ' ',
        badge(decision),
        ' ',
        el('time', { class: 'muted mono', title: fmtTime(at) }, offset || fmtTime(at)),
        num(ev.seq) !== null ? el('span', { class: 'muted seq' }, ` #${ev.seq}`) : null),
      fields.length ? el('dl', { class: 'fields' }, ...fields) : null);
  }

  // ---- the tree's keys (WAI-ARIA tree view pattern) ------------------------
  function treeItems() {
    return [...$('tree').querySelectorAll('[role=treeitem]')];
  }
  function isShown(item) {
    for (let p = item.parentElement; p && p.id !== 'tree'; p = p.parentElement) {
      if (p.getAttribute('role') === 'group' && p.hidden) return false;
    }
    return true;
  }
  function focusItem(item) {
    if (!item) return;
    for (const i of treeItems()) i.tabIndex = -1;
    item.tabIndex = 0;
    item.focus();
  }
  function setExpanded(item, open) {
    if (!item.hasAttribute('aria-expanded')) return;
    item.setAttribute('aria-expanded', open ? 'true' : 'false');
    const group = item.querySelector(':scope > [role=group]');
    if (group) group.hidden = !open;
  }

  function onTreeKey(event) {
    const item = event.target.closest('[role=treeitem]');
    if (!item || event.altKey || event.ctrlKey || event.metaKey) return;
    const shown = treeItems().filter(isShown);
    const at = shown.indexOf(item);
    const expanded = item.getAttribute('aria-expanded');
    let handled = true;
    switch (event.key) {
      case 'ArrowDown': focusItem(shown[at + 1]); break;
      case 'ArrowUp': focusItem(shown[at - 1]); break;
      case 'Home': focusItem(shown[0]); break;
      case 'End': focusItem(shown[shown.length - 1]); break;
      case 'ArrowRight':
        if (expanded === 'false') setExpanded(item, true);
        else if (expanded === 'true') focusItem(item.querySelector(':scope > [role=group] > [role=treeitem]'));
        break;
      case 'ArrowLeft':
        if (expanded === 'true') setExpanded(item, false);
        else focusItem(item.parentElement.closest('[role=treeitem]'));
        break;
      case 'Enter':
      case ' ':
        if (expanded !== null) setExpanded(item, expanded === 'false');
        break;
      default: handled = false;
    }
    if (handled) {
      event.preventDefault();
      event.stopPropagation();
    }
  }

  function onTreeClick(event) {
    const item = event.target.closest('[role=treeitem]');
    if (!item) return;
    if (event.target.closest('.twisty') && item.hasAttribute('aria-expanded')) {
      setExpanded(item, item.getAttribute('aria-expanded') === 'false');
    }
    focusItem(item);
  }

  // ---- routing -----------------------------------------------------------
  function route() {
    const m = /^#txn=(.*)$/.exec(location.hash);
    if (!m) {
      showList();
      return;
    }
    let txn = null;
    try {
      txn = decodeURIComponent(m[1]);
    } catch (_) {
      txn = null;
    }
    if (txn === null || txn === '') {
      showList();
      showError($('list-error'), 'The link names no transaction (expected #txn=ID).');
      return;
    }
    openTxn(txn, false);
  }

  function showList() {
    state.current = null;
    state.txnSeq++;
    $('txn-view').hidden = true;
    $('list-view').hidden = false;
    document.title = 'Writ chain explorer';
    if (state.listDirty || state.cursor === null) loadList();
    if (state.lastOpened !== null) {
      const link = [...$('txn-rows').querySelectorAll('a.txn-link')].find((a) => a.dataset.txn === state.lastOpened);
      if (link) link.focus();
    }
  }

  function back() {
    history.pushState(null, '', location.pathname + location.search);
    showList();
  }

  // ---- live updates ------------------------------------------------------
  async function poll() {
    try {
      if (state.cursor === null) {
        await loadList();
        if (state.cursor !== null) setLive(`Live: every ${POLL_MS / 1000} s`, false);
        return;
      }
      const data = await api(`/changes?after=${state.cursor}`);
      seeCursor(data.cursor);
      const changed = Array.isArray(data.txns) ? data.txns.map(str) : [];
      if (changed.length) {
        setLive(`Live: ${changed.length} transaction${changed.length === 1 ? '' : 's'} changed at ${fmtClock(new Date())} UTC`, false);
        if (!$('list-view').hidden) await loadList();
        else state.listDirty = true;
        if (state.current !== null && changed.includes(state.current)) await openTxn(state.current, true);
      } else if ($('live').classList.contains('error')) {
        setLive(`Live: every ${POLL_MS / 1000} s`, false);
      }
    } catch (e) {
      setLive(`Live updates failing: ${errorText(e)}`, true);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function setLive(text, error) {
    const live = $('live');
    live.textContent = text;
    live.classList.toggle('error', error);
  }

  // ---- start -------------------------------------------------------------
  function onSearchInput() {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(() => {
      state.q = $('search').value.trim();
      loadList();
    }, SEARCH_DELAY_MS);
  }

  function onKey(event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    const t = event.target;
    const typing = t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable);
    if (event.key === '/' && !typing) {
      event.preventDefault();
      if (!$('txn-view').hidden) back();
      $('search').focus();
      $('search').select();
    } else if (event.key === 'Escape') {
      if (!$('txn-view').hidden) {
        event.preventDefault();
        back();
      } else if (t === $('search') && $('search').value !== '') {
        $('search').value = '';
        onSearchInput();
      }
    }
  }

  function start() {
    $('search-form').addEventListener('submit', (event) => {
      event.preventDefault();
      clearTimeout(state.searchTimer);
      state.q = $('search').value.trim();
      loadList();
    });
    $('search').addEventListener('input', onSearchInput);
    $('back').addEventListener('click', (event) => {
      event.preventDefault();
      back();
    });
    $('tree').addEventListener('keydown', onTreeKey);
    $('tree').addEventListener('click', onTreeClick);
    document.addEventListener('keydown', onKey);
    window.addEventListener('hashchange', route);
    setLive('Loading', false);
    const first = loadList().then(() => {
      if (state.cursor !== null) setLive(`Live: every ${POLL_MS / 1000} s`, false);
    });
    if (location.hash) route();
    first.finally(() => setTimeout(poll, POLL_MS));
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
