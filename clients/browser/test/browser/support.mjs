// What the browser tests need: real nodes (child processes of the release binary) on 127.0.0.x
// with free ports, a static page server, headless Chromium through playwright-core, and polling
// with deadlines. Every process started here is killed by `cleanup()`.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { createSocket } from 'node:dgram';
import http from 'node:http';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const repoRoot = fileURLToPath(new URL('../../../../', import.meta.url));
export const targetDir = process.env.CARGO_TARGET_DIR ?? join(repoRoot, 'target');
export const binary = process.env.STREAMFARM_BIN ?? join(targetDir, 'release', 'streamfarm');
export const chromiumPath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

const children = new Set();
const cleanups = [];

/** Polls `check` until it returns a truthy value, or fails after `timeoutMs` saying `what`. */
export async function waitFor(what, check, { timeoutMs = 10_000, intervalMs = 20 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** A port free on `ip` for both TCP and UDP (a node gossips on its listen port over UDP). */
export async function freePort(ip) {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = await new Promise((resolve, reject) => {
      const s = createServer();
      s.once('error', reject);
      s.listen(0, ip, () => {
        const { port } = s.address();
        s.close(() => resolve(port));
      });
    });
    const udpFree = await new Promise((resolve) => {
      const u = createSocket('udp4');
      u.once('error', () => resolve(false));
      u.bind(port, ip, () => u.close(() => resolve(true)));
    });
    if (udpFree) return port;
  }
  throw new Error(`no free port on ${ip}`);
}

/** Starts `streamfarm serve` on `ip`; resolves once its `/healthz` answers 200. */
export async function startNode({ name, ip, join: joinAddr, args = [] }) {
  if (!existsSync(binary)) {
    throw new Error(`${binary} is missing: run \`cargo build --release -p streamfarm\` first`);
  }
  const port = await freePort(ip);
  const argv = ['serve', '--name', name, '--listen', `${ip}:${port}`, ...(joinAddr ? ['--join', joinAddr] : []), ...args];
  const proc = spawn(binary, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  children.add(proc);
  proc.on('exit', () => children.delete(proc));
  let output = '';
  proc.stdout.on('data', (d) => (output += d));
  proc.stderr.on('data', (d) => (output += d));
  const base = `http://${ip}:${port}`;
  try {
    await waitFor(
      `node ${name} healthy at ${base}`,
      async () => {
        if (proc.exitCode !== null) throw new Error(`node ${name} exited ${proc.exitCode}`);
        const res = await fetch(`${base}/healthz`);
        return res.ok;
      },
      { timeoutMs: 20_000 },
    );
  } catch (err) {
    err.message += `\n${binary} ${argv.join(' ')} printed:\n${output.slice(-2000)}`;
    throw err;
  }
  return { name, ip, port, base, url: `ws://${ip}:${port}/stream`, gossip: `${ip}:${port}`, proc, output: () => output };
}

/** SIGKILLs a node and waits until it is gone. */
export async function killNode(node) {
  node.proc.kill('SIGKILL');
  await waitFor(`node ${node.name} to exit`, () => node.proc.exitCode !== null || node.proc.signalCode !== null);
}

/** `GET /farm` of a node, as JSON. */
export async function farm(base) {
  const res = await fetch(`${base}/farm`, { headers: { Accept: 'application/json' } });
  if (!res.ok) throw new Error(`GET ${base}/farm: ${res.status}`);
  return res.json();
}

/** `POST /publish/{topic}`. */
export async function publish(base, topic, body) {
  const res = await fetch(`${base}/publish/${encodeURIComponent(topic)}`, { method: 'POST', body });
  if (!res.ok) throw new Error(`POST ${base}/publish/${topic}: ${res.status} ${await res.text()}`);
  return res.json();
}

/** A static server for test pages on `ip` (a third origin, so that /farm is read cross-origin). */
export async function pageServer(ip, pages) {
  const server = http.createServer((req, res) => {
    const page = pages[new URL(req.url, 'http://x').pathname];
    if (!page) {
      res.writeHead(404).end();
      return;
    }
    const type = req.url.endsWith('.js') ? 'text/javascript' : 'text/html';
    res.writeHead(200, { 'content-type': `${type}; charset=utf-8`, 'cache-control': 'no-store' }).end(page);
  });
  await new Promise((resolve) => server.listen(0, ip, resolve));
  cleanups.push(() => new Promise((resolve) => server.close(resolve)));
  server.closeAllConnections?.();
  return { base: `http://${ip}:${server.address().port}`, server };
}

/** Headless Debian Chromium with a new empty profile (see the README's test notes). */
export async function launchBrowser() {
  if (!existsSync(chromiumPath)) throw new Error(`${chromiumPath} is missing: apt-get install chromium`);
  const profile = mkdtempSync(join(tmpdir(), 'streamfarm-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1100, height: 640 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  cleanups.push(async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  });
  return context;
}

/** Kills every node and closes every browser and server started here. */
export async function cleanup() {
  for (const proc of children) proc.kill('SIGKILL');
  await Promise.all([...children].map((p) => new Promise((r) => (p.exitCode !== null || p.signalCode !== null ? r() : p.once('exit', r)))));
  for (const c of cleanups.splice(0).reverse()) await c();
}

process.on('exit', () => {
  for (const proc of children) proc.kill('SIGKILL');
});
