// The shared selection vectors, run against the built ES module (the code that ships). The file is
// the one the Rust core runs too (crates/core/tests/data/selection.json).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as sf from '../../dist/streamfarm.min.mjs';

const vectors = JSON.parse(
  readFileSync(fileURLToPath(new URL('../../../../crates/core/tests/data/selection.json', import.meta.url)), 'utf8'),
);

test('the vector file has patent and random vectors', () => {
  const policies = new Set(vectors.vectors.map((v) => v.policy));
  assert.ok(policies.has('patent') && policies.has('random'), [...policies].join());
});

for (const v of vectors.vectors) {
  test(`vector ${v.name} (${v.policy})`, () => {
    assert.ok(sf.POLICIES.includes(v.policy) || v.policy in sf.POLICY_ALIASES, `policy ${v.policy} is not implemented`);
    const list = { servers: v.servers };
    const exclude = v.exclude ?? [];
    if (v.expect.error) {
      assert.throws(() => sf.probabilities(v.policy, list, exclude), (e) => e.code === v.expect.error);
      assert.throws(() => sf.choose(v.policy, list, exclude, sf.seededRng(1)), (e) => e.code === v.expect.error);
      return;
    }
    const got = sf.probabilities(v.policy, list, exclude);
    const want = v.expect.probabilities;
    assert.equal(Object.keys(want).length, list.servers.length);
    list.servers.forEach((s, i) => {
      assert.ok(s.url in want, `no expectation for ${s.url}`);
      assert.ok(Math.abs(got[i] - want[s.url]) <= vectors.tolerance, `${s.url}: ${got[i]} vs ${want[s.url]}`);
    });
    for (let seed = 0; seed < 64; seed++) {
      const pick = sf.choose(v.policy, list, exclude, sf.seededRng(seed));
      assert.ok(got[pick.index] > 0, `seed ${seed} picked ${list.servers[pick.index].url}, probability 0`);
    }
  });
}

const farm = (users) => ({
  servers: users.map((u, i) => ({ name: `s${i}`, url: `ws://s${i}/`, status: 'UP', users: u, priority: 'A' })),
});
const close = (a, b) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) < 1e-12);

test('the seeds example gives 0.501 and 0.499', () => {
  const p = sf.probabilities('patent', {
    servers: [
      { url: 'a', status: 'UP', users: 2963, priority: 'A' },
      { url: 'b', status: 'DOWN', users: 0, priority: 'B' },
      { url: 'n', status: 'UP', users: 2979, priority: 'A' },
    ],
  });
  assert.ok(Math.abs(p[0] - 0.501) < 0.001 && p[1] === 0 && Math.abs(p[2] - 0.499) < 0.001, String(p));
});

test('sampled frequencies follow the probabilities', () => {
  const rng = sf.seededRng(7);
  const counts = [0, 0, 0];
  for (let i = 0; i < 20000; i++) counts[sf.choose('patent', farm([100, 200, 700]), [], rng).index]++;
  [0.45, 0.4, 0.15].forEach((e, i) => assert.ok(Math.abs(counts[i] / 20000 - e) < 0.015, String(counts)));
});

test('p2c and least-users match the Rust unit tests', () => {
  assert.deepEqual(sf.probabilities('p2c', farm([0, 10, 20])), [2 / 3, 1 / 3, 0]);
  assert.deepEqual(sf.probabilities('least-users', farm([5, 3, 3])), [0, 0.5, 0.5]);
});

test('numeric group labels compare as numbers', () => {
  assert.deepEqual(sf.groupOrder(['10', '2', '1']), ['1', '2', '10']);
  assert.deepEqual(sf.groupOrder(['B', 'A', 'B']), ['A', 'B']);
});

// The waterfill cases of crates/core/src/selection/waterfill.rs, with the same numbers.
test('waterfill: a fresh list is least-users', () => {
  for (const users of [[5, 3, 3], [0, 10, 20], [7], [4, 4, 4, 4], [9, 1, 2, 1]]) {
    assert.ok(close(sf.probabilities('waterfill', farm(users)), sf.probabilities('least-users', farm(users))), String(users));
  }
});

test('waterfill: emptier servers get more and full ones nothing', () => {
  const p = sf.probabilities('waterfill', farm([1000, 0, 250, 100]), [], { listAgeS: 0.5, arrivalRate: 400 });
  assert.ok(p[1] > p[3] && p[3] > 0 && p[0] === 0 && p[2] === 0, String(p));
  assert.ok(Math.abs(p[1] - 150.5 / 201) < 1e-9, String(p));
});

test('waterfill: list join rates are used when the client knows no better', () => {
  const list = farm([0, 100]);
  list.servers.forEach((s) => (s.join_rate = 200));
  assert.ok(close(sf.probabilities('waterfill', list, [], { listAgeS: 0.5 }), [150.5 / 201, 50.5 / 201]));
});

test('waterfill: the guard holds back a server that took the in-flight clients', () => {
  const list = farm([8000, 10000, 10000]);
  [10000, 0, 0].forEach((r, i) => (list.servers[i].join_rate = r));
  const p = sf.probabilities('waterfill', list, [], { listAgeS: 0.5 });
  const capped = 11000 + 1 / 3 + (2 * 5001) / 3 - 13000;
  const others = 1000 + 1 / 3;
  const total = capped + 2 * others;
  assert.ok(close(p, [capped / total, others / total, others / total]), String(p));
});

test('waterfill: a reconnecting client counts the lost servers users as arriving', () => {
  const list = farm([1000, 900, 900]);
  list.servers[1].join_rate = 10;
  list.servers[2].join_rate = 30;
  assert.equal(sf.reconnectingContext(list, 'ws://s0/', 2, 4).arrivalRate, 290);
  assert.equal(sf.reconnectingContext(list, 'ws://s0/', 2, 0).arrivalRate, 540);
});

test('waterfill: capacities compare fill fractions; nonsense rates count as zero', () => {
  const list = farm([100, 100]);
  list.servers[0].capacity = 1000;
  list.servers[1].capacity = 200;
  assert.deepEqual(sf.probabilities('waterfill', list), [1, 0]);
  for (const rate of [NaN, -5, Infinity]) {
    assert.deepEqual(sf.probabilities('waterfill', farm([3, 1]), [], { listAgeS: 1, arrivalRate: rate }), [0, 1]);
  }
});

// The count-age cases of crates/core/src/selection.rs, with the same numbers.
test('every policy compares counts of one instant', () => {
  const list = farm([150, 100, 100]);
  list.servers[0].users_age_ms = 0;
  list.servers[0].join_rate = 500;
  for (const s of list.servers.slice(1)) {
    s.users_age_ms = 100;
    s.join_rate = 500;
  }
  for (const policy of sf.POLICIES) {
    const p = sf.probabilities(policy, list);
    assert.ok(p.every((x) => Math.abs(x - 1 / 3) < 1e-9), `${policy}: ${p}`);
  }
});

test('waterfill: the counts age adds to the list age, and in_flight is the least water', () => {
  const list = farm([0, 300]);
  for (const s of list.servers) {
    s.users_age_ms = 1000;
    s.join_rate = 150;
  }
  const aged = sf.probabilities('waterfill', list);
  for (const s of list.servers) delete s.users_age_ms;
  assert.deepEqual(aged, sf.probabilities('waterfill', list, [], { listAgeS: 1 }));
  // 301 in flight over 0 and 300: level 300.5, the same as 300 arrivals over a 1 s-old list.
  const fresh = farm([0, 300]);
  fresh.in_flight = 301;
  assert.ok(close(sf.probabilities('waterfill', fresh), [300.5 / 301, 0.5 / 301]), String(sf.probabilities('waterfill', fresh)));
});

test('patent names the weighted policy: the same probabilities and the same pick', () => {
  const list = farm([100, 200, 700]);
  assert.deepEqual(sf.probabilities('patent', list), sf.probabilities('weighted', list));
  assert.deepEqual(sf.POLICY_ALIASES, { patent: 'weighted' });
  assert.equal(sf.choose('patent', list, [], sf.seededRng(5)).index, sf.choose('weighted', list, [], sf.seededRng(5)).index);
  assert.throws(() => sf.probabilities('toString', list), /unknown policy "toString"/);
});
