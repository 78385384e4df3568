// The selection cases for a list's `draw` and `in_flight`, run against the built ES module (the code
// that ships). The file is the one the Rust core runs too (crates/core/tests/selection_extra.rs):
// both clients must give the same probabilities and the same pick.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as sf from '../../dist/streamfarm.min.mjs';

const file = JSON.parse(
  readFileSync(fileURLToPath(new URL('../../../../crates/core/tests/data/selection_extra.json', import.meta.url)), 'utf8'),
);

test('the cases cover draws in and out of range and clients in flight', () => {
  const lists = file.cases.map((c) => c.list);
  assert.ok(lists.some((l) => l.draw >= 0 && l.draw < 1));
  assert.ok(lists.some((l) => l.draw !== undefined && !(l.draw >= 0 && l.draw < 1)));
  assert.ok(lists.some((l) => l.in_flight > 1));
});

for (const c of file.cases) {
  test(`case ${c.name} (${c.policy})`, () => {
    // The client's own draw: a fixed number, so that the pick is exact either way.
    const ownDraw = () => c.own_draw;
    const exclude = c.exclude ?? [];
    if (c.expect.error) {
      assert.throws(() => sf.choose(c.policy, c.list, exclude, ownDraw), (e) => e.code === c.expect.error);
      return;
    }
    const got = sf.choose(c.policy, c.list, exclude, ownDraw);
    const want = c.expect.choice;
    assert.equal(Object.keys(want.probabilities).length, c.list.servers.length);
    c.list.servers.forEach((s, i) => {
      assert.ok(s.url in want.probabilities, `no expectation for ${s.url}`);
      const p = want.probabilities[s.url];
      assert.ok(Math.abs(got.probabilities[i] - p) <= file.tolerance, `${s.url}: ${got.probabilities[i]} vs ${p}`);
    });
    assert.equal(c.list.servers[got.index].url, want.pick);
  });
}

test("a list's draw in range leaves the client's RNG untouched, as in Rust", () => {
  const list = file.cases.find((c) => c.list.draw === 0.5).list;
  let calls = 0;
  sf.choose('patent', list, [], () => (calls++, 0));
  assert.equal(calls, 0);
  sf.choose('patent', { ...list, draw: 1 }, [], () => (calls++, 0));
  assert.equal(calls, 1);
});

test('a draw that is not a number is the client\'s own', () => {
  const list = { ...file.cases.find((c) => c.list.draw === 0.5).list, draw: '0.5' };
  assert.equal(sf.choose('patent', list, [], () => 0.0625).index, 0);
});
