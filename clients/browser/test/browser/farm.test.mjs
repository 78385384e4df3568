// The browser client and the dashboard in a real headless Chromium against a real farm of three
// nodes (the release binary) on 127.0.0.1-3. In order: a page on a third origin loads the client
// from a node, reaches the farm through a seed list, picks its server and receives messages
// published over HTTP on another node; the dashboard shows every node and follows a change in
// users within 1 s (and is photographed, see `dashboardPicture`); the page's node is SIGKILLed and
// the page fails over by the machine's transitions (re-request the list at once, elsewhere) and
// resubscribes — and, with nodes that send positions, misses nothing. Every wait polls with a
// deadline; every process is killed at the end.
//
// STREAMFARM_BIN=path runs another build of the node; with STREAMFARM_NO_WEB=1 (a build without
// the web routes, e.g. one from before them) the page takes the script from the test's own page
// server and the dashboard test is skipped.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { cleanup, farm, killNode, launchBrowser, pageServer, publish, startNode, targetDir, waitFor } from './support.mjs';

let nodes;
let browser;
let site;
let page;
let dash;
const noWeb = process.env.STREAMFARM_NO_WEB === '1';
// The dashboard's picture goes under the build's target/ folder, so a test run changes no tracked
// file; `npm run dashboard-picture` sets STREAMFARM_DASHBOARD_PICTURE to refresh docs/dashboard.png.
const dashboardPicture = resolve(process.env.STREAMFARM_DASHBOARD_PICTURE ?? join(targetDir, 'browser-test', 'dashboard.png'));

const pageHtml = (clientSrc, seeds) => `<!doctype html><html><head><meta charset="utf-8"><title>feed</title>
<script src="${clientSrc}"></script></head><body><pre id="out"></pre><script>
  window.log = [];
  window.received = [];
  const client = new streamfarm.Client({ seeds: ${JSON.stringify(seeds)}, topics: ['prices', 'tick', 'seq'] });
  window.client = client;
  for (const name of ['connected', 'disconnected', 'failover', 'retrying', 'maybeMissed', 'recovered', 'gap', 'subscription']) {
    client.on(name, (e) => window.log.push({ at: Date.now(), name, ...e }));
  }
  client.on('transition', (e) => window.log.push({ at: Date.now(), name: 'transition', input: e.input, state: e.state, actions: e.actions }));
  client.on('message', (m) => {
    if (window.received.length === 0) window.firstMessageMs = performance.now();
    window.received.push(m);
    document.getElementById('out').textContent += m.topic + ' ' + m.data + '\\n';
  });
</script></body></html>`;

before(async () => {
  const a = await startNode({ name: 'a', ip: '127.0.0.1' });
  const b = await startNode({ name: 'b', ip: '127.0.0.2', join: a.gossip });
  const c = await startNode({ name: 'c', ip: '127.0.0.3', join: a.gossip, args: ['--priority', 'B'] });
  nodes = [a, b, c];
  await waitFor('every node to list three UP servers', async () => {
    const lists = await Promise.all(nodes.map((n) => farm(n.base)));
    return lists.every((l) => l.servers.filter((s) => s.status === 'UP').length === 3);
  });
  // A dead seed first in the list: the client must get past it.
  const seeds = ['http://127.0.0.1:1', a.base, b.base];
  const bundle = readFileSync(new URL('../../dist/streamfarm.min.js', import.meta.url), 'utf8');
  site = await pageServer('127.0.0.4', {
    '/feed.html': pageHtml(noWeb ? '/streamfarm.js' : `${b.base}/client/streamfarm.js`, seeds),
    '/blank.html': '<!doctype html><title>blank</title>',
    '/streamfarm.js': bundle,
  });
  browser = await launchBrowser();
}, { timeout: 60_000 });

after(cleanup);

const nodeOf = (url) => nodes.find((n) => n.url === url);

test('a page loads the client from a node, picks its server and receives messages published on another node', async (t) => {
  // A publisher ticks every 10 ms, so that page load → first message can be measured.
  let ticking = true;
  const ticker = (async () => {
    for (let i = 0; ticking; i++) {
      await publish(nodes[2].base, 'tick', `t${i}`).catch(() => {});
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  page = await browser.newPage();
  page.on('pageerror', (err) => console.error('page error:', err));
  await page.goto(`${site.base}/feed.html`);
  const server = await waitFor('the page to be connected and subscribed', () =>
    page.evaluate(() => window.client.server() && window.log.some((e) => e.name === 'subscription' && e.state === 'subscribed') && window.client.server()),
  );
  assert.ok(nodeOf(server), `the page picked ${server}, not a node of the farm`);
  const firstMs = await waitFor('the first tick', () => page.evaluate(() => window.firstMessageMs), { timeoutMs: 5000 });
  ticking = false;
  await ticker;
  t.diagnostic(`page load → first message: ${firstMs.toFixed(0)} ms (navigation start to the first tick; ticks every 10 ms)`);

  // The pick shows up in the farm's users: the page holds exactly one connection, on its server.
  await waitFor(`the farm to count the page on ${server}`, async () => {
    const list = await farm(nodes[0].base);
    const total = list.servers.reduce((sum, s) => sum + s.users, 0);
    return total === 1 && list.servers.find((s) => s.url === server).users === 1;
  });

  // Publish on a node that is not the page's, in order; all arrive, in order, once each.
  const other = nodes.find((n) => n.url !== server);
  for (let i = 1; i <= 5; i++) await publish(other.base, 'prices', `EURUSD ${i}`);
  const prices = await waitFor('five prices on the page', async () => {
    const got = await page.evaluate(() => window.received.filter((m) => m.topic === 'prices').map((m) => m.data));
    return got.length >= 5 && got;
  });
  assert.deepEqual(prices, [1, 2, 3, 4, 5].map((i) => `EURUSD ${i}`));
});

test('the dashboard shows every node and reflects a change in users within 1 s', { skip: noWeb && 'STREAMFARM_NO_WEB' }, async (t) => {
  dash = await browser.newPage();
  await dash.setViewportSize({ width: 1100, height: 380 });
  // From c (group B): the pages pick group A, so the node killed later is never the dashboard's.
  await dash.goto(`${nodes[2].base}/dashboard`);
  assert.equal(await dash.title(), 'streamfarm · farm');
  await waitFor('the dashboard to show a, b and c UP', () =>
    dash.evaluate(() => ['a', 'b', 'c'].every((n) => document.querySelector(`.row[data-server="${n}"][data-status="UP"]`))),
  );
  const shown = (name) =>
    dash.evaluate((n) => Number(document.querySelector(`.row[data-server="${n}"] .users`)?.textContent), name);
  // Add five users on c from another page, and time how soon the dashboard shows them.
  const target = nodes[2];
  await waitFor('the dashboard to agree with c', async () => (await shown('c')) === (await farm(target.base)).servers.find((s) => s.name === 'c').users);
  const before = await shown('c');
  const crowd = await browser.newPage();
  await crowd.goto(`${site.base}/blank.html`);
  const opened = await crowd.evaluate(async (url) => {
    window.sockets = [];
    await Promise.all(
      Array.from({ length: 5 }, () => new Promise((resolve, reject) => {
        const ws = new WebSocket(url);
        ws.onmessage = (ev) => JSON.parse(ev.data).type === 'hello' && resolve();
        ws.onerror = reject;
        window.sockets.push(ws);
      })),
    );
    return Date.now();
  }, target.url);
  await waitFor(`the dashboard to show ${before + 5} users on c`, async () => (await shown('c')) === before + 5, { timeoutMs: 5000, intervalMs: 10 });
  const tookMs = Date.now() - opened;
  t.diagnostic(`dashboard showed the new users ${tookMs} ms after the connections were open`);
  assert.ok(tookMs <= 1000, `the dashboard took ${tookMs} ms`);

  await crowd.evaluate(() => window.sockets.forEach((ws) => ws.close()));
  await crowd.close();
});

test('the page fails over when its node is SIGKILLed: re-request the list elsewhere, resubscribe', async (t) => {
  const lostServer = await page.evaluate(() => window.client.server());
  const victim = nodeOf(lostServer);
  const mark = await page.evaluate(() => window.log.length);
  // A publisher on c (group B: never the page's server) across the kill and the failover.
  const acked = [];
  let publishing = true;
  const publisher = (async () => {
    for (let i = 0; publishing; i++) {
      try {
        await publish(nodes[2].base, 'seq', `s${i}`);
        acked.push(`s${i}`);
      } catch {}
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  await waitFor('the page to receive the sequence', () => page.evaluate(() => window.received.some((m) => m.topic === 'seq')));
  await killNode(victim);
  const killedAt = Date.now();
  const failover = await waitFor('the page to fail over', () =>
    page.evaluate((from) => window.log.slice(from).find((e) => e.name === 'failover'), mark),
  );
  t.diagnostic(`failover ${failover.from} → ${failover.to} in ${failover.tookMs} ms (kill → failover event ${failover.at - killedAt} ms)`);
  assert.equal(failover.from, lostServer);
  assert.notEqual(failover.to, lostServer);
  assert.ok(nodeOf(failover.to), failover.to);

  // The machine's transitions, as the Rust client's by default (immediate): lost → re-request
  // the list at once, from the survivors → connect to a survivor; the lost server is not tried.
  const steps = await page.evaluate((from) => window.log.slice(from).filter((e) => e.name === 'transition'), mark);
  const acted = steps.filter((s) => s.actions.some((a) => a.type !== 'notify'));
  const summary = acted.map((s) => `${s.input}: ${s.actions.filter((a) => a.type !== 'notify').map((a) => a.type + (a.server ? ` ${a.server}${a.retry ? ' (retry)' : ''}` : '') + (a.source ? ` ${JSON.stringify(a.source)}` : '')).join(', ')}`);
  t.diagnostic(summary.join(' | '));
  assert.equal(acted[0].input, 'lost');
  const fetch = acted[0].actions.find((a) => a.type === 'fetch_list');
  assert.ok(fetch, `on the loss the list is re-requested at once: ${summary[0]}`);
  if (fetch.source.kind === 'servers') assert.ok(!fetch.source.urls.includes(lostServer), 'the lost server is not asked for the list');
  const retries = steps.flatMap((s) => s.actions).filter((a) => a.type === 'connect' && a.server === lostServer);
  assert.equal(retries.length, 0, 'the lost server is not tried again while survivors are listed');

  // Resubscribed: a message published on a survivor arrives.
  const survivor = nodes.find((n) => n !== victim);
  const seen = await page.evaluate(() => window.received.length);
  await waitFor('a message after the failover', async () => {
    await publish(survivor.base, 'prices', 'after failover');
    return page.evaluate((n) => window.received.slice(n).some((m) => m.data === 'after failover'), seen);
  }, { intervalMs: 100 });
  const subscribed = await page.evaluate(() => window.client.server());
  assert.equal(subscribed, failover.to);

  // The sequence across the failover: with positions, every acknowledged message after the
  // page's first one arrives exactly once, in order; without, the loss is counted and reported.
  publishing = false;
  await publisher;
  const last = acked[acked.length - 1];
  await waitFor(`${last} on the page`, () => page.evaluate((l) => window.received.some((m) => m.data === l), last));
  const seq = await page.evaluate(() => window.received.filter((m) => m.topic === 'seq'));
  const got = seq.map((m) => m.data);
  const expected = acked.slice(acked.indexOf(got[0]));
  const missing = expected.filter((d) => !got.includes(d));
  const positioned = seq.some((m) => typeof m.offset === 'number');
  t.diagnostic(`${expected.length} messages published from the page's first across the kill: ${missing.length} missed, ${got.length - new Set(got).size} duplicated, ${seq.filter((m) => m.recovered).length} recovered (${positioned ? 'positions' : 'no positions on these nodes'})`);
  if (positioned) {
    assert.deepEqual(got, expected, 'with positions: every message exactly once, in order');
  } else {
    assert.equal(new Set(got).size, got.length, 'no duplicates');
    const log = await page.evaluate((from) => window.log.slice(from), mark);
    assert.ok(log.some((e) => e.name === 'maybeMissed'), 'without positions a possible loss is reported');
  }

  // The dashboard lists the killed node DOWN; its picture is taken with messages flowing so that
  // messages/s shows.
  if (noWeb) return;
  await waitFor(`the dashboard to show ${victim.name} DOWN`, () =>
    dash.evaluate((n) => document.querySelector(`.row[data-server="${n}"][data-status="DOWN"]`) !== null, victim.name),
  );
  const dashNode = nodes.find((n) => n.base === new URL(dash.url()).origin);
  const flowUntil = Date.now() + 2200;
  for (let i = 0; Date.now() < flowUntil; i++) {
    await publish((dashNode === victim ? survivor : dashNode).base, 'prices', `tick ${i}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  mkdirSync(dirname(dashboardPicture), { recursive: true });
  const picture = await dash.screenshot({ path: dashboardPicture });
  assert.deepEqual([...picture.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], 'a PNG');
  assert.deepEqual(readFileSync(dashboardPicture), picture, `the picture written to ${dashboardPicture}`);
  t.diagnostic(`dashboard picture: ${dashboardPicture}`);
});
