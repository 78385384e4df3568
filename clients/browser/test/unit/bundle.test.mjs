// The committed bundles must be what src/ builds to: the Rust node embeds dist/streamfarm.min.js
// with include_str!, so a stale file would ship old code.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

test('the committed bundles are fresh builds of src/', () => {
  const script = fileURLToPath(new URL('../../scripts/build.mjs', import.meta.url));
  const run = spawnSync(process.execPath, [script, '--check'], { encoding: 'utf8' });
  assert.equal(run.status, 0, run.stderr + run.stdout);
});

test('the IIFE defines the global streamfarm', async () => {
  const { readFileSync } = await import('node:fs');
  const text = readFileSync(fileURLToPath(new URL('../../dist/streamfarm.min.js', import.meta.url)), 'utf8');
  const scope = {};
  new Function('globalThis', 'self', 'window', `${text}; globalThis.streamfarm = streamfarm;`)(scope, scope, scope);
  assert.equal(typeof scope.streamfarm.Client, 'function');
  assert.equal(typeof scope.streamfarm.Machine, 'function');
});

test('token expiry is read from the JWT and refreshes come early', async () => {
  const sf = await import('../../dist/streamfarm.min.mjs');
  const b64url = (text) => Buffer.from(text).toString('base64url');
  const jwt = `${b64url('{"alg":"HS256"}')}.${b64url('{"sub":"u","exp":1795327061}')}.sig`;
  assert.equal(sf.tokenExpiry(jwt), 1795327061);
  assert.equal(sf.tokenExpiry('not-a-jwt'), undefined);
  assert.equal(sf.refreshDelayMs(1000, 0), 970_000);
  assert.equal(sf.refreshDelayMs(10, 0), 5_000);
  assert.equal(sf.refreshDelayMs(10, 20_000), 0);
  assert.equal(sf.CLOSE.AUTH_EXPIRED, 4012);
});
