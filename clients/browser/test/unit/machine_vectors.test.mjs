// The failover machine's shared transition vectors, the same files the Rust machine's tests run
// (crates/client/tests/machine_vectors.rs): the two machines cannot drift apart unnoticed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as sf from '../../dist/streamfarm.min.mjs';

const load = (name) =>
  JSON.parse(readFileSync(fileURLToPath(new URL(`../../../../crates/client/tests/data/${name}`, import.meta.url)), 'utf8'));

/** The vectors' input (snake_case) as the TypeScript machine's. */
function input(v) {
  switch (v.type) {
    case 'list_fetched':
      return { type: v.type, list: v.list, via: v.via, ageMs: v.age_ms ?? 0 };
    default:
      return v;
  }
}

/** A TypeScript action in the vectors' shape; random delays are checked against the expectation. */
function shape(a, expected = {}) {
  const below = (delay, limit) => (limit !== undefined && delay < limit ? limit : `${delay} ms`);
  switch (a.type) {
    case 'connect':
      return { type: 'connect', server: a.server, reuse_list_connection: a.reuseListConnection, retry: a.retry };
    case 'sleep':
      return { type: 'sleep', timer: a.timer, delay_below_ms: below(a.delayMs, expected.delay_below_ms) };
    case 'notify': {
      const n = a.notice;
      if (n.type === 'failed_over') return { type: 'notify', notice: { type: n.type, from: n.from, to: n.to, took_ms: n.tookMs } };
      if (n.type === 'migrated')
        return { type: 'notify', notice: { type: n.type, from: n.from, to: n.to, reason: n.reason, took_ms: n.tookMs } };
      if (n.type === 'migration_failed') return { type: 'notify', notice: { type: n.type, server: n.server, to: n.to } };
      if (n.type === 'retrying') return { type: 'notify', notice: { type: n.type, delay_below_ms: below(n.delayMs, expected.notice?.delay_below_ms) } };
      return { type: 'notify', notice: n };
    }
    default:
      return a;
  }
}

function state(s) {
  switch (s.type) {
    case 'fetching_list':
      return { type: s.type, from_service_address: s.fromServiceAddress, fallback: s.fallback };
    case 'migrating':
      return { type: s.type, from: s.from, to: s.to };
    default:
      return s;
  }
}

for (const name of ['machine_transitions.json', 'migration_vectors.json']) {
  const file = load(name);
  assert.ok(file.vectors.length > 0, name);
  for (const vector of file.vectors) {
    test(`machine vector ${vector.name}`, () => {
      const m = new sf.Machine({ ...sf.DEFAULT_MACHINE_CONFIG, retry: vector.retry }, sf.seededRng(1));
      vector.steps.forEach((step, i) => {
        const actions = m.handle(input(step.input), step.at_ms);
        const got = actions.map((a, k) => shape(a, step.expect[k]));
        assert.deepEqual(got, step.expect, `step ${i} (${step.input.type})`);
        if (step.state) assert.deepEqual(state(m.current()), step.state, `step ${i} state`);
        if (step.excluded) assert.deepEqual(m.excluded(step.at_ms), step.excluded, `step ${i} excluded`);
      });
      for (const [url, users] of Object.entries(vector.last_list_users ?? {})) {
        assert.equal(m.list().servers.find((s) => s.url === url).users, users, url);
      }
    });
  }
}
