// The browser client in Chromium against a scripted node: the token hook, reconnecting on
// `online`, and the client duties of the positions protocol (docs/PROTOCOL.md).
//
// Positions:
// Playwright's routeWebSocket stands in for a node that sends positions, under the test's control,
// so the driver's part — positions in every `sub`, duplicates dropped, replayed messages marked,
// recovery and gaps reported — is checked end to end. The farm list comes from a routed /farm.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { cleanup, launchBrowser, waitFor } from './support.mjs';

const bundle = readFileSync(fileURLToPath(new URL('../../dist/streamfarm.min.js', import.meta.url)), 'utf8');
const ORIGIN = 'http://node.test';
const URL_ = 'ws://node.test/stream';
const E = '5f3a9c0e12ab44d1';
const list = { servers: [{ name: 'mock', url: URL_, status: 'UP', users: 0, priority: 'A' }] };

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(cleanup);

async function scriptedPage(onConnection, { options = '{}', farmUp = () => true, urls = [] } = {}) {
  const page = await browser.newPage();
  await page.route(`${ORIGIN}/**`, (route) => {
    const path = new URL(route.request().url()).pathname;
    if (path === '/farm') {
      if (!farmUp()) return route.fulfill({ status: 503, body: 'no', headers: { 'access-control-allow-origin': '*' } });
      return route.fulfill({ json: list, headers: { 'access-control-allow-origin': '*' } });
    }
    if (path === '/client/streamfarm.js') return route.fulfill({ body: bundle, contentType: 'text/javascript' });
    return route.fulfill({ body: '<!doctype html><title>p</title>', contentType: 'text/html' });
  });
  let n = 0;
  await page.routeWebSocket(/^ws:\/\/node\.test\/stream/, (ws) => {
    if (!farmUp()) {
      // The whole node is down: its WebSocket refuses too.
      ws.close({ code: 1011, reason: 'down' });
      return;
    }
    const index = n++;
    urls.push(ws.url());
    const send = (frame) => ws.send(JSON.stringify(frame));
    send({ type: 'hello', server: 'mock', url: URL_, status: 'UP', heartbeat_interval_ms: 1000, heartbeat_timeout_ms: 3000, max_frame_bytes: 65536 });
    send({ type: 'farm', ...list });
    ws.onMessage((text) => {
      const frame = JSON.parse(text);
      if (frame.type === 'ping') send({ type: 'pong', id: frame.id });
      else onConnection(index, frame, send, ws);
    });
  });
  await page.goto(`${ORIGIN}/`);
  await page.addScriptTag({ url: `${ORIGIN}/client/streamfarm.js` });
  await page.evaluate((options) => {
    window.log = [];
    const client = new streamfarm.Client({ seeds: ['http://node.test'], topics: ['prices'], ...eval(`(${options})`) });
    window.client = client;
    for (const name of ['message', 'recovered', 'gap', 'maybeMissed', 'failover', 'connected', 'retrying']) {
      client.on(name, (e) => window.log.push({ name, ...e }));
    }
  }, options);
  return page;
}

test('positions travel in sub, duplicates are dropped, recovery and gaps are reported', async () => {
  const subs = [];
  const page = await scriptedPage((index, frame, send, ws) => {
    if (frame.type !== 'sub') return;
    subs.push({ index, frame });
    if (index === 0) {
      send({ type: 'subscribed', topics: frame.topics, positions: { prices: { epoch: E, offset: 5 } } });
      for (const offset of [6, 7, 7, 8]) send({ type: 'msg', topic: 'prices', data: `p${offset}`, epoch: E, offset });
      // A node that breaks the connection (slow consumer: the client retries the same server).
      setTimeout(() => ws.close({ code: 4001, reason: 'slow consumer' }), 200);
    } else {
      send({ type: 'subscribed', topics: frame.topics, positions: { prices: { epoch: E, offset: 11 } } });
      for (const offset of [8, 9, 10, 11]) send({ type: 'msg', topic: 'prices', data: `p${offset}`, epoch: E, offset });
      send({ type: 'msg', topic: 'prices', data: 'p12', epoch: E, offset: 12 });
      send({ type: 'gap', topic: 'prices', epoch: E, from: 13, to: 15, reason: 'history_exceeded' });
      send({ type: 'msg', topic: 'prices', data: 'p16', epoch: E, offset: 16 });
    }
  });
  const log = await waitFor('p16 on the page', async () => {
    const log = await page.evaluate(() => window.log);
    return log.some((e) => e.name === 'message' && e.data === 'p16') && log;
  });
  assert.deepEqual(subs.map((s) => s.frame), [
    { type: 'sub', topics: ['prices'] },
    { type: 'sub', topics: ['prices'], positions: { prices: { epoch: E, offset: 8 } } },
  ]);
  const messages = log.filter((e) => e.name === 'message').map((e) => `${e.data}${e.recovered ? ' (recovered)' : ''}`);
  assert.deepEqual(messages, ['p6', 'p7', 'p8', 'p9 (recovered)', 'p10 (recovered)', 'p11 (recovered)', 'p12', 'p16']);
  const recovered = log.find((e) => e.name === 'recovered');
  assert.deepEqual(recovered, { name: 'recovered', topic: 'prices', recovered: 3, from: { epoch: E, offset: 8 }, to: { epoch: E, offset: 11 } });
  const gap = log.find((e) => e.name === 'gap');
  assert.deepEqual(gap, { name: 'gap', topic: 'prices', epoch: E, from: 13, to: 15, reason: 'history_exceeded' });
  assert.ok(!log.some((e) => e.name === 'maybeMissed'), 'a node with positions leaves nothing in doubt');
  assert.deepEqual(await page.evaluate(() => window.client.position('prices')), { epoch: E, offset: 16 });
  await page.close();
});

test('a node without positions: every message is delivered, a failover reports maybeMissed', async () => {
  const subs = [];
  const page = await scriptedPage((index, frame, send, ws) => {
    if (frame.type !== 'sub') return;
    subs.push(frame);
    send({ type: 'subscribed', topics: frame.topics });
    send({ type: 'msg', topic: 'prices', data: `c${index}` });
    send({ type: 'msg', topic: 'prices', data: `c${index}` });
    if (index === 0) setTimeout(() => ws.close({ code: 4001, reason: 'slow consumer' }), 200);
  });
  const log = await waitFor('maybeMissed after the reconnection', async () => {
    const log = await page.evaluate(() => window.log);
    return log.some((e) => e.name === 'maybeMissed') && log.filter((e) => e.name === 'message').length >= 4 && log;
  });
  assert.deepEqual(subs, [{ type: 'sub', topics: ['prices'] }, { type: 'sub', topics: ['prices'] }]);
  assert.deepEqual(log.filter((e) => e.name === 'message').map((e) => e.data), ['c0', 'c0', 'c1', 'c1']);
  assert.deepEqual(log.find((e) => e.name === 'maybeMissed').topics, ['prices']);
  await page.close();
});

test('the token hook is asked before every connection, and its token travels in the url', async () => {
  const urls = [];
  const page = await scriptedPage(
    (index, frame, send, ws) => {
      if (frame.type !== 'sub') return;
      send({ type: 'subscribed', topics: frame.topics });
      if (index === 0) setTimeout(() => ws.close({ code: 4001, reason: 'slow consumer' }), 100);
    },
    { options: "{ getToken: async () => 'tok-' + (window.tokens = (window.tokens || 0) + 1) }", urls },
  );
  await waitFor('the reconnection', async () => (await page.evaluate(() => window.log.filter((e) => e.name === 'connected').length)) >= 2);
  assert.deepEqual(urls, [`${URL_}?token=tok-1`, `${URL_}?token=tok-2`]);
  await page.close();
});

test('a token is refreshed in band before it expires, on the same connection', async () => {
  const urls = [];
  const refreshes = [];
  const page = await scriptedPage(
    (index, frame, send) => {
      if (frame.type === 'sub') send({ type: 'subscribed', topics: frame.topics });
      if (frame.type === 'refresh') {
        refreshes.push(frame.token);
        send({ type: 'refreshed' });
      }
    },
    {
      // Tokens of 2 s (a JWT-shaped string: the client reads `exp`, the node checks the rest).
      options: `{ getToken: async () => {
        window.tokens = (window.tokens || 0) + 1;
        const claims = btoa(JSON.stringify({ n: window.tokens, exp: Math.floor(Date.now() / 1000) + 2 }));
        return 'e30.' + claims.replace(/=+$/, '') + '.sig';
      } }`,
      urls,
    },
  );
  await waitFor('two refreshes', async () => refreshes.length >= 2, { timeoutMs: 8000 });
  const claims = (token) => JSON.parse(Buffer.from(token.split('.')[1], 'base64').toString());
  assert.deepEqual(refreshes.slice(0, 2).map((t) => claims(t).n), [2, 3]);
  assert.equal(urls.length, 1, 'no reconnection');
  await page.close();
});

test('coming back online ends a backoff wait at once', async () => {
  let up = false;
  const page = await scriptedPage(
    (index, frame, send) => frame.type === 'sub' && send({ type: 'subscribed', topics: frame.topics }),
    // A one-minute backoff, drawn at its top: without the online event the client would wait.
    { options: '{ backoff: { baseMs: 60000, capMs: 60000 }, rng: () => 0.99 }', farmUp: () => up },
  );
  const retrying = await waitFor('a backoff wait', async () => (await page.evaluate(() => window.log)).find((e) => e.name === 'retrying'));
  assert.ok(retrying.delayMs > 50_000, String(retrying.delayMs));
  up = true;
  const before = Date.now();
  await page.evaluate(() => window.dispatchEvent(new Event('online')));
  await waitFor('connected after online', async () => (await page.evaluate(() => window.log)).some((e) => e.name === 'connected'), { timeoutMs: 5000 });
  assert.ok(Date.now() - before < 5000);
  await page.close();
});

test('a topic subscribed while the connection is being made is subscribed once it is made', async () => {
  const subs = [];
  let reply;
  const page = await scriptedPage((index, frame, send) => {
    if (frame.type !== 'sub') return;
    subs.push(frame.topics);
    // The first `subscribed` waits until the test has added a topic meanwhile.
    if (subs.length === 1) reply = () => send({ type: 'subscribed', topics: frame.topics });
    else send({ type: 'subscribed', topics: frame.topics });
  });
  await waitFor('the first sub', () => reply);
  await page.evaluate(() => {
    window.news = window.client.subscribe('news');
  });
  reply();
  await waitFor('news subscribed', () => page.evaluate(() => window.news.state === 'subscribed'));
  assert.deepEqual(subs, [['prices'], ['news']]);
  await page.close();
});
