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
