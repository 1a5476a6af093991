// The dashboard in headless Chromium (see scripts/browser-test.sh, which starts the broker's
// consumer and `producer serve` and sets the environment). Exits non-zero on the first check
// that fails, after a screenshot of the page as it was.
import { createRequire } from 'node:module';
import { randomUUID } from 'node:crypto';

const require = createRequire(process.cwd() + '/target/browser/package.json');
const { chromium } = require('playwright-core');

const base = process.env.DASHBOARD_URL;
const token = process.env.DASHBOARD_TOKEN;
const namespace = process.env.NAMESPACE;
const mgmt = process.env.MANAGEMENT_URL;
const amqp = new URL(process.env.AMQP_URL);
const user = decodeURIComponent(amqp.username) || 'guest';
const password = decodeURIComponent(amqp.password) || 'guest';
const mgmtAuth = 'Basic ' + Buffer.from(`${user}:${password}`).toString('base64');
const auth = { Authorization: `Bearer ${token}` };
const shots = 'target/screenshots';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (...args) => console.log('browser-test:', ...args);

function check(ok, what) {
  if (!ok) throw new Error('check failed: ' + what);
  log('ok -', what);
}

async function api(path, options = {}) {
  const response = await fetch(base + path, {
    ...options,
    headers: { ...auth, 'Content-Type': 'application/json', ...(options.headers || {}) },
    signal: AbortSignal.timeout(15000),
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

// A job that died earlier (a consumer since fixed), put straight into the dead letters with
// the headers a consumer gives it: replaying it must bring back a result.
async function bury(id) {
  const job = { schema_version: 1, id, kind: 'text.analyze', created_at: new Date().toISOString(),
    payload: { text: 'back from the dead' } };
  const vhost = encodeURIComponent('/');
  const response = await fetch(`${mgmt}/api/exchanges/${vhost}/${namespace}.jobs.dlx/publish`, {
    method: 'POST',
    headers: { Authorization: mgmtAuth, 'Content-Type': 'application/json' },
    body: JSON.stringify({
      routing_key: 'text.analyze', payload: JSON.stringify(job), payload_encoding: 'string',
      properties: { message_id: id, content_type: 'application/json', delivery_mode: 2,
        headers: { 'x-error': 'analyze: upstream unavailable (browser test)', 'x-failed-stage': 'analyze', 'x-attempts': 5 } },
    }),
    signal: AbortSignal.timeout(10000),
  });
  const body = await response.json();
  check(response.ok && body.routed === true, `a dead letter ${id} is in ${namespace}.jobs.dead`);
}

async function firstDrawn(page) {
  await page.waitForFunction(() => Number(document.body.dataset.snapshots) >= 1, null, { timeout: 20000 });
}

async function main() {
  const deadId = randomUUID();
  await bury(deadId);
  const failed = await api('/jobs', { method: 'POST', body: JSON.stringify({ kind: 'text.analyze', payload: { nope: 1 } }) });
  check(failed.status === 202, 'a job that will fail is accepted');
  const failedId = failed.body.id;

  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-quic', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 1100 } });
  const page = await context.newPage();
  const errors = [];
  let tokenGiven = false;
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    // Before the token is given, the page's polls get 401s, which Chromium logs.
    if (!tokenGiven && /status of 401/.test(msg.text())) return;
    errors.push(msg.text());
  });
  page.on('pageerror', (error) => errors.push('uncaught: ' + error.message));
  let failedScreenshot = true;
  try {
    // 1. The page asks for the token, then draws.
    await page.goto(base + '/dashboard', { waitUntil: 'load' });
    await page.waitForSelector('#auth:not([hidden])', { timeout: 10000 });
    check(true, 'the page asks for a token');
    await page.fill('#token', token);
    await page.click('#token-save');
    await firstDrawn(page);
    // From here on, any console error counts (a poll sent before the token may still have
    // logged its 401 until now).
    tokenGiven = true;
    check(await page.isHidden('#auth'), 'the token is taken and the page draws');
    for (const source of ['management', 'results', 'metrics']) {
      await page.waitForSelector(`[data-source="${source}"].ok`, { timeout: 15000 });
      check(true, `source ${source} is reachable`);
    }

    // 2. Load time: a fresh page with the token already in the session.
    const second = await context.newPage();
    await second.addInitScript((t) => sessionStorage.setItem('queue-worker-token', t), token);
    const started = Date.now();
    await second.goto(base + '/dashboard', { waitUntil: 'load' });
    const loaded = Date.now() - started;
    await firstDrawn(second);
    const drawn = Date.now() - started;
    log(`figure - load: ${loaded} ms to the load event, ${drawn} ms to the first data drawn`);

    // 3. The numbers move during a burst of 5,000 jobs.
    const samples = [];
    const sampling = (async () => {
      for (let i = 0; i < 40; i++) {
        samples.push(await page.evaluate(() => ({
          out: document.getElementById('rate-out').textContent,
          work: document.getElementById('depth-work').textContent,
          in: document.getElementById('rate-in').textContent,
        })));
        await sleep(500);
      }
    })();
    const ids = [];
    for (let b = 0; b < 5; b++) {
      const batch = Array.from({ length: 1000 }, (_, i) => ({ kind: 'text.analyze', payload: { text: `burst ${b} ${i} ` + 'word '.repeat(20) } }));
      const sent = await api('/jobs/batch', { method: 'POST', body: JSON.stringify(batch) });
      check(sent.status === 202, `burst batch ${b + 1} of 5 accepted`);
      ids.push(...sent.body.ids);
      if (b === 2) await page.screenshot({ path: `${shots}/dashboard-burst.png`, fullPage: true });
      // Spread over seconds: the broker updates its message counters every 5 s.
      await sleep(1000);
    }
    await sampling;
    const outs = new Set(samples.map((s) => s.out).filter((v) => v !== '–'));
    const peak = Math.max(...samples.map((s) => Number(String(s.out).replace(/,/g, '')) || 0));
    log('figure - jobs/s out seen on the page:', [...outs].join(' '));
    check(outs.size >= 3 && peak > 0, `jobs/s out moved during the burst (${outs.size} values, peak ${peak})`);
    const ins = samples.map((s) => Number(String(s.in).replace(/,/g, '')) || 0);
    log('figure - jobs/s in seen on the page:', [...new Set(ins)].join(' '));
    check(Math.max(...ins) > 0, `jobs/s in rose during the burst (peak ${Math.max(...ins)})`);
    const last = await api(`/jobs/${ids[ids.length - 1]}`);
    check([200, 202].includes(last.status), 'the burst is known to serve');

    // 4. The failed job is listed with its reason.
    await page.waitForSelector(`#failures tbody td:text("${failedId}")`, { timeout: 20000 });
    check(true, 'the failed job is under recent failures');

    // 5. Replay the dead letter from the page; its result comes back.
    const row = `#dead tbody tr[data-id="${deadId}"]`;
    await page.click('#dead-refresh');
    await page.waitForSelector(row, { timeout: 20000 });
    check(true, 'the dead letter is listed');
    await page.check(`${row} input.pick`);
    await page.click('#dead-replay');
    await page.waitForFunction(() => /replayed 1\b/.test(document.getElementById('dead-status').textContent), null, { timeout: 20000 });
    check(true, 'the page says the letter was replayed');
    let result = null;
    for (let i = 0; i < 60 && !result; i++) {
      const got = await api(`/jobs/${deadId}`);
      if (got.status === 200) result = got.body; else await sleep(500);
    }
    check(result && result.status === 'ok', 'the replayed dead letter came back as a result (status ok)');
    await page.waitForSelector(row, { state: 'detached', timeout: 20000 });
    check(true, 'the replayed letter is no longer listed as dead');

    // 6. Refresh cost on the broker: management API requests per second, one page and three.
    // Requests per second over the measured window (the reads themselves may refresh too).
    const requests = async () => [Date.now(), (await api('/dashboard/data')).body.sources.management.requests];
    const rate = ([t0, n0], [t1, n1]) => (n1 - n0) / ((t1 - t0) / 1000);
    await second.close();
    let before = await requests();
    await sleep(10000);
    const one = rate(before, await requests());
    const more = [await context.newPage(), await context.newPage()];
    for (const p of more) {
      await p.addInitScript((t) => sessionStorage.setItem('queue-worker-token', t), token);
      await p.goto(base + '/dashboard');
    }
    before = await requests();
    await sleep(10000);
    const three = rate(before, await requests());
    log(`figure - management API requests/s: ${one.toFixed(2)} with one page open, ${three.toFixed(2)} with three`);
    // One refresh (4 requests) per 1.8 s at most, however many pages: 2.2/s; three pages
    // polling on their own would be three times one page.
    check(three <= 2.6, 'three open pages cost the broker no more than one refresh at a time');

    await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
    check(errors.length === 0, `no console errors (${errors.join(' | ') || 'none'})`);
    failedScreenshot = false;
    log('all checks passed; screenshots in', shots);
  } finally {
    if (failedScreenshot) await page.screenshot({ path: `${shots}/dashboard-failed.png`, fullPage: true }).catch(() => {});
    await browser.close();
  }
}

main().catch((error) => {
  console.error('browser-test:', error.message);
  process.exit(1);
});
