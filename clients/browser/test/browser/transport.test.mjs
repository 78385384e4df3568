// The browser client's transports and moves in a real headless Chromium against real nodes (the
// release binary) on 127.0.0.1-3 and .5, the page on a fourth origin (127.0.0.4), a publisher on
// a group-B node (never the page's server). In order, on one page whose WebSocket the test
// blocks (every WebSocket it opens goes to a closed port, so it closes before opening, as behind
// a proxy that refuses the upgrade) and later allows again:
// - the page falls back to server-sent events; the time from navigation to its first message is
//   reported, not asserted;
// - a drain moves it make-before-break over its event streams: 0 lost, 0 duplicated;
// - its node is SIGKILLed while it streams over SSE: it resumes elsewhere from its event id,
//   0 lost, 0 duplicated;
// - with the WebSocket allowed again, the next failover (a kill) upgrades it to a WebSocket
//   make-before-break: 0 lost, 0 duplicated;
// - a drain moves it make-before-break over WebSockets: 0 lost, 0 duplicated.
// The dashboard, open on the publisher's node all along, counts the page among the SSE users,
// shows every server's rebalancing target, and charts the moves and failovers.
// Every wait polls with a deadline; every process is killed at the end.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { cleanup, farm, killNode, launchBrowser, pageServer, publish, startNode, waitFor } from './support.mjs';

const ADMIN = 'browser-test-admin-token-0123456789abcdef';
const FAST = [
  '--gossip-interval-ms', '50',
  '--failure-timeout-ms', '1000',
  '--heartbeat-interval-ms', '300',
  '--heartbeat-timeout-ms', '1500',
  '--drain-period-ms', '300',
  // No rebalancing: the page moves only when the test moves it (a drain, a kill); a rebalance
  // racing a kill would make that failover a migration.
  '--rebalance', 'false',
  '--migrate-deadline-ms', '5000',
  '--admin-token', ADMIN,
];

let nodes;
let publisher;
let browser;
let page;
let dash;

const pageHtml = (seeds) => `<!doctype html><html><head><meta charset="utf-8"><title>transports</title>
<script src="/streamfarm.js"></script></head><body><script>
  window.log = [];
  window.received = [];
  const client = new streamfarm.Client({ seeds: ${JSON.stringify(seeds)}, topics: ['tick'] });
  window.client = client;
  for (const name of ['connected', 'disconnected', 'failover', 'transport', 'migrated', 'migrationFailed', 'maybeMissed', 'recovered', 'gap', 'error']) {
    client.on(name, (e) => window.log.push({ at: Date.now(), name, ...e }));
  }
  client.on('message', (m) => {
    if (window.received.length === 0) window.firstMessageMs = performance.now();
    window.received.push(m);
  });
</script></body></html>`;

before(async () => {
  const a = await startNode({ name: 'a', ip: '127.0.0.1', args: FAST });
  const b = await startNode({ name: 'b', ip: '127.0.0.2', join: a.gossip, args: FAST });
  const c = await startNode({ name: 'c', ip: '127.0.0.3', join: a.gossip, args: FAST });
  publisher = await startNode({ name: 'p', ip: '127.0.0.5', join: a.gossip, args: [...FAST, '--priority', 'B'] });
  nodes = [a, b, c];
  await waitFor('every node to list four UP servers', async () => {
    const lists = await Promise.all([...nodes, publisher].map((n) => farm(n.base)));
    return lists.every((l) => l.servers.filter((s) => s.status === 'UP').length === 4);
  });
  const bundle = readFileSync(new URL('../../dist/streamfarm.min.js', import.meta.url), 'utf8');
  const site = await pageServer('127.0.0.4', { '/feed.html': pageHtml(nodes.map((n) => n.base)), '/streamfarm.js': bundle });
  browser = await launchBrowser();
  page = await browser.newPage();
  page.on('pageerror', (err) => console.error('page error:', err));
  // Every WebSocket the page opens goes to a closed port while `wsBlocked` holds.
  await page.addInitScript(() => {
    const Real = window.WebSocket;
    window.wsBlocked = true;
    window.WebSocket = class extends Real {
      constructor(url, protocols) {
        super(window.wsBlocked ? 'ws://127.0.0.1:9/' : url, protocols);
      }
    };
  });
  // The page ticks from the start, so that navigation → first message can be measured.
  ticking = (async () => {
    for (let i = 0; !stopTicking; i++) {
      await publish(publisher.base, 'tick', `t${i}`).catch(() => {});
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  await page.goto(`${site.base}/feed.html`);
}, { timeout: 90_000 });

let ticking;
let stopTicking = false;

after(async () => {
  stopTicking = true;
  await ticking;
  await cleanup();
});

const nodeOf = (url) => [...nodes, publisher].find((n) => n.url === url);
const lastEvent = (name, from) => page.evaluate(([n, f]) => window.log.slice(f).find((e) => e.name === n), [name, from]);

/**
 * Publishes `topic` on the publisher every 10 ms from the page's subscription until `move`
 * resolves and a little after, and returns what the page received beside what was acknowledged
 * from its first message on.
 */
async function across(t, topic, move) {
  await page.evaluate((tp) => window.client.subscribe(tp), topic);
  await waitFor(`${topic} subscribed`, () => page.evaluate((tp) => window.client.subscribe(tp).state === 'subscribed', topic));
  const acked = [];
  let publishing = true;
  const run = (async () => {
    for (let i = 0; publishing; i++) {
      try {
        await publish(publisher.base, topic, `${topic}-${i}`);
        acked.push(`${topic}-${i}`);
      } catch {}
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  await waitFor(`the page to receive ${topic}`, () => page.evaluate((tp) => window.received.some((m) => m.topic === tp), topic));
  const outcome = await move();
  // Messages after the move, then the last one on the page.
  const moved = acked.length;
  await waitFor('20 messages after the move', () => acked.length >= moved + 20);
  publishing = false;
  await run;
  const last = acked[acked.length - 1];
  await waitFor(`${last} on the page`, () => page.evaluate((l) => window.received.some((m) => m.data === l), last), { timeoutMs: 15_000 });
  const got = await page.evaluate((tp) => window.received.filter((m) => m.topic === tp).map((m) => m.data), topic);
  const expected = acked.slice(acked.indexOf(got[0]));
  const missing = expected.filter((d) => !got.includes(d));
  const duplicated = got.length - new Set(got).size;
  t.diagnostic(`${expected.length} messages across the move: ${missing.length} lost, ${duplicated} duplicated`);
  assert.deepEqual(got, expected, 'every message exactly once, in order');
  return outcome;
}

async function drain(node) {
  const res = await fetch(`${node.base}/admin/status`, { method: 'POST', headers: { Authorization: `Bearer ${ADMIN}` }, body: 'DRAINING' });
  assert.equal(res.status, 200, await res.text());
}

async function undrain(node) {
  const res = await fetch(`${node.base}/admin/status`, { method: 'POST', headers: { Authorization: `Bearer ${ADMIN}` }, body: 'UP' });
  assert.equal(res.status, 200, await res.text());
}

test('with the WebSocket blocked the page falls back to server-sent events and receives messages', async (t) => {
  const firstMs = await waitFor('the first message', () => page.evaluate(() => window.firstMessageMs), { timeoutMs: 15_000 });
  t.diagnostic(`navigation → first message over SSE with the WebSocket blocked: ${Math.round(firstMs)} ms`);
  assert.equal(await page.evaluate(() => window.client.transport()), 'sse');
  const change = await lastEvent('transport', 0);
  assert.equal(change.transport, 'sse', JSON.stringify(change));
  const connected = await lastEvent('connected', 0);
  assert.equal(connected.transport, 'sse');

  // Frames up are POSTs to the serving node: the page's own publish comes back down its stream;
  // a bad one is answered with the node's error frame, and the stream stays.
  await page.evaluate(() => window.client.subscribe('echo'));
  await waitFor('echo subscribed', () => page.evaluate(() => window.client.subscribe('echo').state === 'subscribed'));
  assert.equal(await page.evaluate(() => window.client.publish('echo', 'from the page')), true);
  await waitFor("the page's own message", () => page.evaluate(() => window.received.some((m) => m.topic === 'echo' && m.data === 'from the page')));
  const mark = await page.evaluate(() => window.log.length);
  await page.evaluate(() => window.client.publish('not a topic', 'x'));
  const error = await waitFor("the node's error frame", () => lastEvent('error', mark));
  assert.notEqual(error.code, 'send_failed', JSON.stringify(error));
  // The stream still carries the page's frames both ways, and was never lost.
  await page.evaluate(() => window.client.publish('echo', 'after the error'));
  await waitFor('a message after the error', () => page.evaluate(() => window.received.some((m) => m.data === 'after the error')));
  assert.equal(await lastEvent('disconnected', mark), undefined, 'the stream stays');
  assert.equal(await page.evaluate(() => window.client.transport()), 'sse');
});

test('the dashboard counts the page among the SSE users and shows every server against its target', async () => {
  dash = await browser.newPage();
  dash.on('pageerror', (err) => console.error('dashboard error:', err));
  await dash.goto(`${publisher.base}/dashboard`);
  const server = nodeOf(await page.evaluate(() => window.client.server()));
  await waitFor(`the dashboard to show an SSE user on ${server.name}`, () =>
    dash.evaluate((n) => Number(document.querySelector(`.row[data-server="${n}"]`)?.dataset.sse) >= 1 && Number(document.getElementById('sse').textContent) >= 1, server.name),
  );
  await waitFor('a target on every server', () =>
    dash.evaluate(() => [...document.querySelectorAll('.row')].length === 4 && [...document.querySelectorAll('.row')].every((r) => r.dataset.target !== undefined && r.querySelector('.target'))),
  );
});

test('a drain moves the page make-before-break over event streams: 0 lost, 0 duplicated', async (t) => {
  const mark = await page.evaluate(() => window.log.length);
  const from = nodeOf(await page.evaluate(() => window.client.server()));
  const migrated = await across(t, 'sse-drain', async () => {
    await drain(from);
    return waitFor('the page to migrate', () => lastEvent('migrated', mark));
  });
  t.diagnostic(`migrated ${migrated.from} → ${migrated.to} (${migrated.reason}) in ${migrated.tookMs} ms over ${migrated.transport}`);
  assert.equal(migrated.from, from.url);
  assert.equal(migrated.transport, 'sse');
  assert.equal(await lastEvent('disconnected', mark), undefined, 'never disconnected');
  await undrain(from);
});

test('a node killed while it streams over SSE: the page resumes elsewhere, 0 lost, 0 duplicated', async (t) => {
  const mark = await page.evaluate(() => window.log.length);
  const victim = nodeOf(await page.evaluate(() => window.client.server()));
  const failover = await across(t, 'sse-kill', async () => {
    await killNode(victim);
    return waitFor('the page to fail over', () => lastEvent('failover', mark));
  });
  t.diagnostic(`failover ${failover.from} → ${failover.to} in ${failover.tookMs} ms over ${failover.transport}`);
  assert.equal(failover.from, victim.url);
  assert.equal(failover.transport, 'sse');
  nodes = nodes.filter((n) => n !== victim);
  // The WebSocket is still blocked: the try after the failover leaves the event stream.
  assert.equal(await page.evaluate(() => window.client.transport()), 'sse');
});

test('with the WebSocket allowed again the next failover upgrades the page make-before-break: 0 lost, 0 duplicated', async (t) => {
  await page.evaluate(() => {
    window.wsBlocked = false;
  });
  const mark = await page.evaluate(() => window.log.length);
  const victim = nodeOf(await page.evaluate(() => window.client.server()));
  const upgrade = await across(t, 'upgrade', async () => {
    await killNode(victim);
    const failover = await waitFor('the page to fail over', () => lastEvent('failover', mark));
    const change = await waitFor('the page to upgrade', () => lastEvent('transport', mark));
    return { failover, change };
  });
  t.diagnostic(`killed ${victim.url}; failover ${upgrade.failover.from} → ${upgrade.failover.to} in ${upgrade.failover.tookMs} ms over ${upgrade.failover.transport}, then ${upgrade.change.transport} on ${upgrade.change.server} (${upgrade.change.reason})`);
  assert.equal(upgrade.failover.transport, 'sse', 'the failover itself uses the transport the session knows works');
  assert.equal(upgrade.change.transport, 'websocket');
  assert.equal(upgrade.change.server, upgrade.failover.to, 'the upgrade is on the server failed over to');
  assert.equal(await page.evaluate(() => window.client.transport()), 'websocket');
  nodes = nodes.filter((n) => n !== victim);
});

test('a drain moves the page make-before-break over WebSockets: 0 lost, 0 duplicated', async (t) => {
  // The last node of group A drains: the page moves to the publisher's group.
  const mark = await page.evaluate(() => window.log.length);
  const from = nodeOf(await page.evaluate(() => window.client.server()));
  const migrated = await across(t, 'ws-drain', async () => {
    await drain(from);
    return waitFor('the page to migrate', () => lastEvent('migrated', mark));
  });
  t.diagnostic(`migrated ${migrated.from} → ${migrated.to} (${migrated.reason}) in ${migrated.tookMs} ms over ${migrated.transport}`);
  assert.equal(migrated.from, from.url);
  assert.equal(migrated.transport, 'websocket');
  assert.equal(await lastEvent('disconnected', mark), undefined, 'never disconnected');
  // The dashboard's node received the page: a move; two nodes died with the page on them.
  await waitFor('the dashboard to chart the moves and failovers', () =>
    dash.evaluate(() => Number(document.getElementById('moves').textContent) >= 1 && Number(document.getElementById('failovers').textContent) >= 2),
  );
  assert.ok(await dash.evaluate(() => document.querySelectorAll('#chart rect.moves').length >= 1));
});
