// The shared positions vectors, the same file the Rust client's tests run
// (crates/client/tests/positions_vectors.rs): event ids as the node writes and reads them, and
// the position-keeping of the Rust client's `Topics`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Positions, encodeEventId, parseEventId } from '../../dist/streamfarm.min.mjs';

const file = JSON.parse(
  readFileSync(fileURLToPath(new URL('../../../../crates/client/tests/data/positions_vectors.json', import.meta.url)), 'utf8'),
);

test('event ids encode and parse as the vectors say', () => {
  for (const c of file.event_ids) {
    const id = encodeEventId(c.positions);
    if (c.id !== null) assert.equal(id, c.id);
    assert.match(id, /^[\x21-\x7e]*$/);
    assert.deepEqual(parseEventId(id), c.positions, id);
  }
  for (const c of file.parsed) assert.deepEqual(parseEventId(c.id), c.positions, c.id);
  for (const c of file.bad_ids) {
    const id = c.id_of_as ? 'a'.repeat(c.id_of_as) : c.id;
    assert.throws(
      () => parseEventId(id),
      (err) => c.error_contains.every((word) => err.message.includes(word)) || assert.fail(`${id.slice(0, 40)}: ${err.message}`),
    );
  }
});

/** The notices of one step in the vectors' shape (a recovery's count, a gap's fields). */
const recovered = (r) => ({ type: 'recovered', topic: r.topic, count: r.recovered });
const gap = (g) => ({ type: 'gap', ...g });

for (const vector of file.topics) {
  test(`positions vector ${vector.name}`, () => {
    const p = new Positions();
    // The browser client keeps its subscriptions beside its positions: a topic's position is
    // held only while it is subscribed.
    const subscribed = new Set();
    vector.steps.forEach((step, i) => {
      let notices = [];
      let deliver;
      switch (step.op) {
        case 'subscribe':
          for (const t of step.topics) subscribed.add(t);
          break;
        case 'unsubscribe':
          for (const t of step.topics) {
            subscribed.delete(t);
            p.forget(t);
          }
          break;
        case 'lost':
          p.lost();
          break;
        case 'subscribed': {
          const topics = Object.keys(step.positions).filter((t) => subscribed.has(t));
          notices = p.subscribed(topics, step.positions).map(recovered);
          break;
        }
        case 'message': {
          const out = p.message(step.topic, step.position?.epoch, step.position?.offset);
          deliver = out.verdict.deliver;
          // A jump wins over the recovery it completes, as in the Rust client.
          if (out.gap) notices.push(gap(out.gap));
          else if (out.recovery) notices.push(recovered(out.recovery));
          break;
        }
        case 'gap': {
          const g = { topic: step.topic, epoch: step.epoch, from: step.from, reason: step.reason };
          if (step.to !== undefined) g.to = step.to;
          notices.push(gap(g));
          const r = p.gap(g);
          if (r) notices.push(recovered(r));
          break;
        }
        default:
          assert.fail(`unknown op ${step.op}`);
      }
      assert.deepEqual(notices, step.notices ?? [], `step ${i} (${step.op}) notices`);
      if ('deliver' in step) assert.equal(deliver, step.deliver, `step ${i} deliver`);
      if (step.held) {
        const held = Object.fromEntries([...subscribed].sort().flatMap((t) => (p.get(t) ? [[t, p.get(t)]] : [])));
        assert.deepEqual(held, step.held, `step ${i} held`);
      }
    });
  });
}
