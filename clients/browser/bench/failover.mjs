// Failover measured in the browser: N pages (default 50) in one headless Chromium, each a client
// subscribed to one topic, on three nodes of the release binary (groups A, A, B); a publisher
// sends a message every 10 ms on the group-B node; the A node holding the most pages is
// SIGKILLed. Prints the affected pages' `failover.tookMs` as p50/p99/max, the connect actions
// per affected page (the retry, then the pick) and how many picks reused their list connection;
// it ends once every page has the last message published.
//
//   cargo build --release -p streamfarm && cd clients/browser && node bench/failover.mjs [pages]
import { cleanup, farm, killNode, launchBrowser, pageServer, publish, startNode, waitFor } from '../test/browser/support.mjs';

const pages = Number(process.argv[2] ?? 50);
const quantile = (xs, q) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)];
};

try {
  const a = await startNode({ name: 'a', ip: '127.0.0.1' });
  const b = await startNode({ name: 'b', ip: '127.0.0.2', join: a.gossip });
  const c = await startNode({ name: 'c', ip: '127.0.0.3', join: a.gossip, args: ['--priority', 'B'] });
  const nodes = [a, b, c];
  await waitFor('three UP servers', async () => (await farm(a.base)).servers.filter((s) => s.status === 'UP').length === 3);
  const html = `<!doctype html><title>p</title><script src="${a.base}/client/streamfarm.js"></script><script>
    window.log = []; window.got = [];
    const client = new streamfarm.Client({ seeds: ${JSON.stringify([a.base, b.base, c.base])}, topics: ['bench'] });
    window.client = client;
    client.on('failover', (e) => window.log.push({ name: 'failover', at: Date.now(), ...e }));
    client.on('transition', (e) => e.actions.forEach((x) => x.type === 'connect' && window.log.push({ name: 'connect', at: Date.now(), retry: x.retry, reuse: x.reuseListConnection })));
    client.on('message', (m) => window.got.push(m.data));
  </script>`;
  const site = await pageServer('127.0.0.4', { '/p.html': html });
  const browser = await launchBrowser();
  const tabs = [];
  for (let i = 0; i < pages; i++) {
    const page = await browser.newPage();
    await page.goto(`${site.base}/p.html`);
    tabs.push(page);
  }
  const servers = await waitFor('every page connected', async () => {
    const s = await Promise.all(tabs.map((p) => p.evaluate(() => window.client.server())));
    return s.every(Boolean) && s;
  }, { timeoutMs: 60_000, intervalMs: 200 });
  const counts = new Map();
  servers.forEach((s) => counts.set(s, (counts.get(s) ?? 0) + 1));
  const victim = [a, b].sort((x, y) => (counts.get(y.url) ?? 0) - (counts.get(x.url) ?? 0))[0];
  const affected = tabs.filter((_, i) => servers[i] === victim.url);
  let seq = 0;
  let publishing = true;
  const publisher = (async () => {
    while (publishing) {
      await publish(c.base, 'bench', `m${seq++}`).catch(() => {});
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  await new Promise((r) => setTimeout(r, 500));
  const killedAt = Date.now();
  await killNode(victim);
  const events = await waitFor('every affected page to fail over', async () => {
    const e = await Promise.all(affected.map((p) => p.evaluate((t) => window.log.filter((x) => x.at >= t), killedAt)));
    return e.every((log) => log.some((x) => x.name === 'failover')) && e;
  }, { timeoutMs: 60_000, intervalMs: 200 });
  await new Promise((r) => setTimeout(r, 1000));
  publishing = false;
  await publisher;
  const last = `m${seq - 1}`;
  await waitFor('the last message everywhere', async () =>
    (await Promise.all(tabs.filter((t) => !affected.includes(t)).concat(affected).map((p) => p.evaluate((m) => window.got.includes(m), last)))).every(Boolean),
  );
  const took = events.map((log) => log.find((x) => x.name === 'failover').tookMs);
  const connects = events.map((log) => log.filter((x) => x.name === 'connect').length);
  const reused = events.map((log) => log.filter((x) => x.name === 'connect' && x.reuse).length).reduce((s, n) => s + n, 0);
  console.log(JSON.stringify({
    pages,
    on_killed_node: affected.length,
    failover_ms: { p50: quantile(took, 0.5), p99: quantile(took, 0.99), max: Math.max(...took) },
    connect_actions_per_page: connects.reduce((s, n) => s + n, 0) / affected.length,
    reused_list_connections: reused,
    per_node_before: Object.fromEntries(nodes.map((n) => [n.name, counts.get(n.url) ?? 0])),
  }));
} finally {
  await cleanup();
}
