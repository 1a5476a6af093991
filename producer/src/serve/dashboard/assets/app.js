// The dashboard page: polls /dashboard/data every 2 s and /dashboard/dead every 15 s, draws
// the plots on canvases, and replays dead letters. Every text shown comes from the network,
// so it is only ever set with textContent (and the server's CSP allows no inline script).
'use strict';

const TOKEN_KEY = 'queue-worker-token';
const COLORS = { in: '#2563eb', out: '#16a34a', failed: '#dc2626', work: '#2563eb', delay: '#a855f7',
  results: '#0891b2', dead: '#dc2626', fanin: '#ca8a04', p50: '#1e40af', p99: '#f59e0b' };
let snapshots = 0;


const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }

async function call(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers.Authorization = 'Bearer ' + token();
  // Every request has a deadline: a stalled connection must not freeze the page.
  const response = await fetch(path, Object.assign({}, options, { headers, cache: 'no-store', signal: AbortSignal.timeout(10000) }));
  if (response.status === 401) {
    $('auth').hidden = false;
    $('auth-error').textContent = token() ? 'this token is refused' : 'this server needs a token';
    throw new Error('unauthorized');
  }
  const body = await response.json().catch(() => ({}));
  return { status: response.status, body };
}

function fmt(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  if (Math.abs(n) >= 10000) return Math.round(n).toLocaleString('en');
  return Number(n).toFixed(digits);
}

function ms(n) {
  if (n === null || n === undefined) return '–';
  if (n >= 1000) return (n / 1000).toFixed(n >= 10000 ? 0 : 1) + ' s';
  if (n >= 100) return Math.round(n) + ' ms';
  return n.toFixed(n >= 10 ? 1 : 2) + ' ms';
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  if (seconds < 120) return seconds + ' s';
  if (seconds < 7200) return Math.round(seconds / 60) + ' min';
  if (seconds < 172800) return Math.round(seconds / 3600) + ' h';
  return Math.round(seconds / 86400) + ' d';
}

function cell(row, text, cls) {
  const td = document.createElement('td');
  td.textContent = text === null || text === undefined ? '–' : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tbody, rows, columns, render) {
  tbody.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = cell(tr, 'none');
    td.colSpan = columns;
    tbody.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement('tr');
    render(tr, row);
    tbody.appendChild(tr);
  }
}

// ---- plots -----------------------------------------------------------------------------

function setup(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 400;
  const height = canvas.clientHeight || 200;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = '11px system-ui, sans-serif';
  return { ctx, width, height };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function message(canvas, text) {
  const { ctx, width, height } = setup(canvas);
  ctx.fillStyle = '#6b7280';
  ctx.textAlign = 'center';
  ctx.fillText(text, width / 2, height / 2);
}

// series: [{ name, color, points: [[t, v|null], ...] }], times in unix seconds.
// With `log`, the y axis is logarithmic (decades), for latencies that span orders of magnitude.
function lines(canvas, series, t0, t1, unit, log) {
  const { ctx, width, height } = setup(canvas);
  const left = 48, right = 8, top = 18, bottom = 18;
  let max = 0, min = Infinity;
  for (const s of series) for (const [, v] of s.points) if (v !== null) { max = Math.max(max, v); if (v > 0) min = Math.min(min, v); }
  ctx.strokeStyle = '#e5e7eb';
  ctx.fillStyle = '#6b7280';
  ctx.textAlign = 'right';
  ctx.lineWidth = 1;
  let scale;
  if (log) {
    const lo = Math.floor(Math.log10(Number.isFinite(min) ? min : 1));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(max > 0 ? max : 10)));
    scale = (v) => (Math.log10(Math.max(v, Math.pow(10, lo))) - lo) / (hi - lo);
    for (let d = lo; d <= hi; d++) {
      const y = top + (height - top - bottom) * (1 - (d - lo) / (hi - lo));
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
      ctx.fillText(ms(Math.pow(10, d)), left - 4, y + 4);
    }
  } else {
    max = niceMax(max);
    scale = (v) => v / max;
    for (let i = 0; i <= 4; i++) {
      const y = top + (height - top - bottom) * (1 - i / 4);
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
      ctx.fillText(fmt(max * i / 4, max < 4 ? 1 : 0) + (unit || ''), left - 4, y + 4);
    }
  }
  ctx.textAlign = 'center';
  for (const back of [600, 300, 0]) {
    const x = left + (width - left - right) * (1 - back / (t1 - t0));
    ctx.fillText(back ? '-' + back / 60 + ' min' : 'now', Math.min(Math.max(x, left + 20), width - 20), height - 4);
  }
  const x = (t) => left + (width - left - right) * (t - t0) / (t1 - t0);
  const y = (v) => top + (height - top - bottom) * (1 - scale(v));
  let legend = left;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.75;
    ctx.beginPath();
    let drawing = false;
    for (const [t, v] of s.points) {
      if (v === null || t < t0) { drawing = false; continue; }
      if (drawing) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      drawing = true;
    }
    ctx.stroke();
    // A point with no neighbour (a short burst) is drawn as a dot, not left invisible.
    ctx.fillStyle = s.color;
    s.points.forEach(([t, v], i) => {
      const alone = (j) => j < 0 || j >= s.points.length || s.points[j][1] === null;
      if (v !== null && t >= t0 && alone(i - 1) && alone(i + 1)) {
        ctx.beginPath(); ctx.arc(x(t), y(v), 2.5, 0, 2 * Math.PI); ctx.fill();
      }
    });
    ctx.textAlign = 'left';
    ctx.fillRect(legend, 4, 10, 10);
    ctx.fillStyle = '#1d2330';
    ctx.fillText(s.name, legend + 13, 13);
    legend += 20 + ctx.measureText(s.name).width;
  }
}

// rows: [{ label, p50, p99 }] drawn as horizontal bars.
function bars(canvas, rows) {
  if (!rows.length) { message(canvas, 'no results in the last 5 minutes'); return; }
  const { ctx, width, height } = setup(canvas);
  const labelWidth = Math.min(260, Math.max(...rows.map((r) => ctx.measureText(r.label).width)) + 8);
  const left = labelWidth, right = 110;
  const shown = rows.slice(0, Math.max(1, Math.floor((height - 4) / 16)));
  const max = niceMax(Math.max(...shown.map((r) => r.p99 || 0)));
  const bar = Math.min(14, (height - 4) / shown.length - 2);
  shown.forEach((r, i) => {
    const y = 2 + i * (bar + 2);
    const w = (v) => (width - left - right) * (v || 0) / max;
    ctx.fillStyle = '#1d2330';
    ctx.textAlign = 'right';
    ctx.fillText(r.label, left - 6, y + bar - 3, labelWidth - 8);
    ctx.fillStyle = '#fcd34d';
    ctx.fillRect(left, y, w(r.p99), bar);
    ctx.fillStyle = '#1e40af';
    ctx.fillRect(left, y + bar / 4, w(r.p50), bar / 2);
    ctx.fillStyle = '#6b7280';
    ctx.textAlign = 'left';
    ctx.fillText(ms(r.p50) + ' / ' + ms(r.p99), left + w(r.p99) + 4, y + bar - 3);
  });
}

// ---- rendering -------------------------------------------------------------------------

function source(name, ok, text, off) {
  const el = document.querySelector('[data-source="' + name + '"]');
  el.classList.toggle('ok', !!ok);
  el.classList.toggle('down', !ok && !off);
  el.classList.toggle('off', !ok && !!off);
  el.querySelector('.state').textContent = text;
}

function render(data) {
  const traffic = data.traffic;
  const mgmt = data.sources.management;
  const metrics = data.sources.metrics;
  const view = mgmt.view || null;
  $('namespace').textContent = data.namespace || '(default)';
  $('updated').textContent = 'updated ' + new Date(data.at * 1000).toLocaleTimeString();

  source('management', mgmt.ok, mgmt.ok
    ? 'ok · ' + (mgmt.url || '') + (view && !view.rates_collected ? ' · no message rates from the broker (yet)' : '')
    : 'unreachable: ' + (mgmt.error || 'no answer') + (mgmt.url ? ' (' + mgmt.url + ')' : ''));
  source('results', data.sources.results.ok, data.sources.results.ok
    ? 'ok · ' + fmt(data.sources.results.received) + ' received'
    : (data.sources.results.error || 'not listening'));
  source('metrics', metrics.ok, metrics.configured
    ? (metrics.ok ? 'ok · ' + metrics.up + ' of ' + metrics.targets.length + ' endpoints' + (metrics.error ? ' · ' + metrics.error : '')
      : 'unreachable: ' + (metrics.error || 'no answer'))
    : metrics.error, !metrics.configured);

  // Each figure says where it comes from. The management API's figures are the broker's
  // statistics, which it refreshes every few seconds (5 s by default): during a burst they
  // lag the results, which arrive as they happen. Where a fresher source exists, it wins.
  const mgmtSource = view ? 'broker statistics, up to ~5 s behind' : 'no answer from the management API';
  for (const el of document.querySelectorAll('.src-mgmt')) el.textContent = mgmtSource;
  const outNow = traffic.out_now || 0;
  $('rate-in').textContent = view ? fmt(view.in_now, 1) : '–';
  $('src-in').textContent = !view ? mgmtSource
    : view.in_now === null || view.in_now === undefined ? 'no rate from the broker yet (its statistics come every ~5 s)'
      : 'broker statistics, up to ~5 s behind';
  $('rate-out').textContent = fmt(traffic.out_now, 1);
  const depth = (role) => view ? fmt(view.depths[role].ready + view.depths[role].unacked) : '–';
  $('depth-work').textContent = depth('work');
  $('depth-delay').textContent = depth('delay');
  $('depth-results').textContent = depth('results');
  // Dead letters: the statistics, unless a look at the queue itself (the list below) is newer
  // than the statistics can be.
  const statsDead = view ? view.depths.dead.ready + view.depths.dead.unacked : null;
  if (deadLook && (statsDead === null || deadLook.at >= data.at - 5)) {
    $('depth-dead').textContent = fmt(deadLook.depth);
    $('src-dead').textContent = 'the queue itself, at ' + new Date(deadLook.at * 1000).toLocaleTimeString();
  } else {
    $('depth-dead').textContent = depth('dead');
    $('src-dead').textContent = mgmtSource;
  }
  $('lat-p50').textContent = ms(traffic.latency_now.p50);
  $('lat-p99').textContent = ms(traffic.latency_now.p99);

  const t1 = data.at, t0 = t1 - 600;
  const steps = (block, key) => block[key].map((v, i) => [block.start + (i + 0.5) * block.step, v]);
  const out = traffic.out.ok.map((v, i) => [traffic.out.start + (i + 0.5) * traffic.out.step, v + traffic.out.failed[i]]);
  const history = mgmt.history || [];
  const from = (key) => history.map((h) => [h.t, h[key]]);
  lines($('plot-rates'), [
    { name: 'in', color: COLORS.in, points: from('in') },
    { name: 'out', color: COLORS.out, points: out },
    { name: 'failed', color: COLORS.failed, points: steps(traffic.out, 'failed') },
  ], t0, t1, '/s');
  if (history.length) {
    lines($('plot-depths'), ['work', 'delay', 'results', 'dead'].map((k) => ({ name: k, color: COLORS[k], points: from(k) })), t0, t1, '');
  } else {
    message($('plot-depths'), 'no depths: ' + (mgmt.error || 'the management API has not answered yet'));
  }
  lines($('plot-latency'), [
    { name: 'p50', color: COLORS.p50, points: steps(traffic.latency, 'p50') },
    { name: 'p99', color: COLORS.p99, points: steps(traffic.latency, 'p99') },
  ], t0, t1, '', true);
  bars($('plot-kinds'), traffic.kinds.map((k) => ({ label: k.kind + ' (' + k.n + ')', p50: k.p50, p99: k.p99 })));
  bars($('plot-stages'), traffic.stages.map((s) => ({ label: s.kind + ' · ' + s.stage, p50: s.p50, p99: s.p99 })));

  // A connection gets an endpoint's metrics only when it is the one connection from that
  // address and the endpoint the one there (replicas of a compose service); others are listed
  // apart, never counted twice.
  const targets = metrics.targets || [];
  const consumers = view ? view.consumers : [];
  const count = (list, key) => list.reduce((m, x) => m.set(x[key], (m.get(x[key]) || 0) + 1), new Map());
  const peers = count(consumers, 'peer');
  const addresses = count(targets, 'address');
  const unique = (t) => t.ok && t.address && addresses.get(t.address) === 1 && peers.get(t.address) === 1;
  const scraped = new Map(targets.filter(unique).map((t) => [t.address, t]));
  const rows = consumers.map((c) => Object.assign({}, c, { metrics: scraped.get(c.peer) }));
  for (const t of targets) {
    if (!unique(t)) rows.push({ name: '(metrics) ' + t.target, peer: t.address, state: t.ok ? 'answering' : (t.error || 'down'), queues: [], metrics: t.ok ? t : null });
  }
  // The management API lists a new connection only after its next statistics: results
  // arriving while it lists none mean at least one consumer it has not listed yet.
  if (view && consumers.length === 0 && outNow > 0) {
    $('consumer-count').textContent = '≥ 1';
    $('src-consumers').textContent = 'results arrive; the broker has not listed a consumer yet';
  } else {
    $('consumer-count').textContent = view ? String(consumers.length) : '–';
    $('src-consumers').textContent = mgmtSource;
  }
  fill($('consumers').tBodies[0], rows, 9, (tr, c) => {
    cell(tr, c.name || c.connection);
    cell(tr, c.peer);
    const blocked = c.metrics && c.metrics.blocked > 0;
    cell(tr, blocked ? 'blocked by the broker' : c.state, blocked || c.state === 'blocked' ? 'bad' : '');
    cell(tr, (c.queues || []).map((q) => q.queue + (q.consumers > 1 ? ' ×' + q.consumers : '')).join(', ') + (c.waiting ? ' (' + c.waiting + ' waiting)' : ''));
    cell(tr, c.prefetch, 'num');
    cell(tr, c.metrics ? fmt(c.metrics.in_flight) : '–', 'num');
    cell(tr, c.metrics ? fmt(c.metrics.processed) : '–', 'num');
    cell(tr, c.metrics ? fmt(c.metrics.failed) : '–', 'num');
    cell(tr, c.metrics ? fmt(c.metrics.reconnects) : '–', 'num');
  });
  fill($('failures').tBodies[0], traffic.failures, 5, (tr, f) => {
    cell(tr, new Date(f.at).toLocaleTimeString());
    cell(tr, f.job_id, 'id');
    cell(tr, f.kind);
    cell(tr, f.attempts, 'num');
    cell(tr, f.error, 'error');
  });
  if (view && view.consumers_error) $('consumer-count').textContent = '?';
  const dead = view ? view.depths.dead.ready + view.depths.dead.unacked : null;
  if (dead !== null && dead !== lastDeadDepth) { lastDeadDepth = dead; loadDead(false); }
}

let lastDeadDepth = null;
// The latest look at the dead-letter queue itself: its depth, and when (seconds).
let deadLook = null;
let polling = false;

// One poll at a time: a slow server gets no pile of requests from this page.
async function poll() {
  if (polling) return;
  polling = true;
  try {
    const { status, body } = await call('/dashboard/data');
    if (status === 200) {
      render(body);
      snapshots += 1;
      document.body.dataset.snapshots = String(snapshots);
      $('auth').hidden = true;
    } else {
      $('updated').textContent = 'the server answered ' + status + (body.error ? ': ' + body.error : '');
    }
  } catch (e) {
    if (e.message !== 'unauthorized') $('updated').textContent = 'no answer from the server (' + e.message + ')';
  } finally {
    polling = false;
  }
}

// ---- dead letters ----------------------------------------------------------------------

function selected() {
  return [...document.querySelectorAll('#dead tbody input.pick:checked')].map((box) => box.value);
}

function updateReplayButton() {
  $('dead-replay').disabled = selected().length === 0;
}

let deadAsked = 0;
let keepStatus = false;

// Looks at the dead letters; an answer older than one asked for since is dropped.
async function loadDead(fresh) {
  const asked = ++deadAsked;
  try {
    const { status, body } = await call('/dashboard/dead' + (fresh ? '?fresh=true' : ''));
    if (asked !== deadAsked) return;
    if (status !== 200) { $('dead-status').textContent = 'the server answered ' + status; return; }
    if (!body.ok) {
      $('dead-depth').textContent = '';
      $('dead-status').textContent = 'cannot look at the dead letters: ' + body.error;
      return;
    }
    if (!keepStatus) $('dead-status').textContent = '';
    keepStatus = false;
    const kept = new Set(selected());
    // The server's look may be a cached one: its own time says how fresh it is.
    deadLook = { depth: body.depth, at: body.at };
    $('depth-dead').textContent = fmt(body.depth);
    $('src-dead').textContent = 'the queue itself, at ' + new Date(body.at * 1000).toLocaleTimeString();
    $('dead-depth').textContent = '(' + body.depth + ' in ' + body.queue + (body.depth > body.letters.length ? ', first ' + body.letters.length + ' shown' : '') + ')';
    fill($('dead').tBodies[0], body.letters, 7, (tr, l) => {
      const td = document.createElement('td');
      if (l.job_id && l.is_job && !l.fanin_check) {
        const box = document.createElement('input');
        box.type = 'checkbox';
        box.className = 'pick';
        box.value = l.job_id;
        box.checked = kept.has(l.job_id);
        box.setAttribute('aria-label', 'select ' + l.job_id);
        box.addEventListener('change', updateReplayButton);
        td.appendChild(box);
      } else {
        td.textContent = 'junk';
        td.title = 'not a job: replay it with producer dead replay --force, or purge it';
      }
      tr.appendChild(td);
      tr.dataset.id = l.job_id || '';
      cell(tr, l.job_id, 'id');
      cell(tr, l.kind);
      cell(tr, l.stage);
      cell(tr, l.attempts, 'num');
      cell(tr, age(l.age));
      cell(tr, l.error, 'error');
    });
    updateReplayButton();
  } catch (e) {
    if (e.message !== 'unauthorized') $('dead-status').textContent = 'no answer from the server (' + e.message + ')';
  }
}

async function replay() {
  const ids = selected();
  if (!ids.length) return;
  $('dead-replay').disabled = true;
  $('dead-status').textContent = 'replaying ' + ids.length + '…';
  try {
    const { status, body } = await call('/dashboard/dead/replay', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ ids }),
    });
    if (status === 200) {
      const t = body.tally;
      $('dead-status').textContent = 'replayed ' + t.replayed + (t.kept ? ', kept ' + t.kept : '') + (t.failed ? ', failed ' + t.failed : '')
        + (t.unconfirmed ? ', unconfirmed ' + t.unconfirmed + ' (they may still run: do not replay them again; purge each once it has a result)' : '')
        + (t.stopped ? '; stopped early: ' + t.stopped : '') + (t.matched < ids.length ? ' (' + (ids.length - t.matched) + ' not found: replayed or purged since, or further back than ' + t.scanned + ' letters)' : '');
    } else if (status === 202) {
      $('dead-status').textContent = 'the replay is still running; look again in a moment';
    } else {
      $('dead-status').textContent = 'not replayed: ' + (body.error || status);
    }
  } catch (e) {
    if (e.message !== 'unauthorized') $('dead-status').textContent = 'not replayed: ' + e.message;
  }
  keepStatus = true;
  await loadDead(true);
}

// ---- start -----------------------------------------------------------------------------

function start() {
  $('auth').addEventListener('submit', (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('token').value.trim());
    $('token').value = '';
    $('auth-error').textContent = '';
    poll();
    loadDead(true);
  });
  $('dead-refresh').addEventListener('click', () => loadDead(true));
  $('dead-replay').addEventListener('click', replay);
  $('dead-all').addEventListener('change', (event) => {
    for (const box of document.querySelectorAll('#dead tbody input.pick')) box.checked = event.target.checked;
    updateReplayButton();
  });
  poll();
  loadDead(false);
  // Dead letters are looked at when their count changes, and on "Look again": a look takes
  // them from the queue and gives them back, so the page does not do it on a timer.
  setInterval(poll, 2000);
}

document.addEventListener('DOMContentLoaded', start);
