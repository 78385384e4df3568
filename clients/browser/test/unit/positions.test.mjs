// The client duties of the positions protocol (docs/PROTOCOL.md, *Positions and recovery*).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Positions } from '../../dist/streamfarm.min.mjs';

const E = '5f3a9c0e12ab44d1';

test('messages without positions (old nodes) are always delivered and nothing is held', () => {
  const p = new Positions();
  assert.deepEqual(p.message('prices', undefined, undefined).verdict, { deliver: true, recovered: false });
  assert.deepEqual(p.message('prices', undefined, undefined).verdict, { deliver: true, recovered: false });
  assert.equal(p.get('prices'), undefined);
  assert.equal(p.forSub(['prices']), undefined);
});

test('a duplicate (same epoch, offset not past the held one) is dropped', () => {
  const p = new Positions();
  assert.equal(p.message('prices', E, 17).verdict.deliver, true);
  assert.equal(p.message('prices', E, 17).verdict.deliver, false);
  assert.equal(p.message('prices', E, 12).verdict.deliver, false);
  assert.equal(p.message('prices', E, 18).verdict.deliver, true);
  // Another epoch is never a duplicate.
  assert.equal(p.message('prices', '77aa01', 1).verdict.deliver, true);
  assert.deepEqual(p.get('prices'), { epoch: '77aa01', offset: 1 });
});

test('sub carries the held positions', () => {
  const p = new Positions();
  p.message('prices', E, 17);
  assert.deepEqual(p.forSub(['prices', 'news']), { prices: { epoch: E, offset: 17 } });
});

test('the first subscribed position is held, so a later resubscription recovers from it', () => {
  const p = new Positions();
  assert.deepEqual(p.subscribed(['news'], { news: { epoch: '77aa01', offset: 0 } }), []);
  assert.deepEqual(p.forSub(['news']), { news: { epoch: '77aa01', offset: 0 } });
});

test('a resubscription replays the missed messages, then reports the recovery', () => {
  const p = new Positions();
  p.message('prices', E, 17);
  assert.deepEqual(p.subscribed(['prices'], { prices: { epoch: E, offset: 20 } }), []);
  assert.deepEqual(p.message('prices', E, 17).verdict, { deliver: false }); // a duplicate replay
  assert.deepEqual(p.message('prices', E, 18).verdict, { deliver: true, recovered: true });
  assert.deepEqual(p.message('prices', E, 19).verdict, { deliver: true, recovered: true });
  const last = p.message('prices', E, 20);
  assert.deepEqual(last.verdict, { deliver: true, recovered: true });
  assert.deepEqual(last.recovery, { topic: 'prices', recovered: 3, from: { epoch: E, offset: 17 }, to: { epoch: E, offset: 20 } });
  assert.deepEqual(p.message('prices', E, 21).verdict, { deliver: true, recovered: false });
});

test('nothing missed: the recovery is complete at once', () => {
  const p = new Positions();
  p.message('prices', E, 20);
  const done = p.subscribed(['prices'], { prices: { epoch: E, offset: 20 } });
  assert.deepEqual(done, [{ topic: 'prices', recovered: 0, from: { epoch: E, offset: 20 }, to: { epoch: E, offset: 20 } }]);
});

test('a gap moves the held position past it and ends the recovery it covers', () => {
  const p = new Positions();
  p.message('prices', E, 17);
  p.subscribed(['prices'], { prices: { epoch: E, offset: 30 } });
  const r = p.gap({ topic: 'prices', epoch: E, from: 18, to: 30, reason: 'history_exceeded' });
  assert.deepEqual(r, { topic: 'prices', recovered: 0, from: { epoch: E, offset: 17 }, to: { epoch: E, offset: 30 } });
  assert.deepEqual(p.get('prices'), { epoch: E, offset: 30 });
  assert.equal(p.message('prices', E, 31).verdict.deliver, true);
});

test('a lost epoch: the next message starts the new epoch', () => {
  const p = new Positions();
  p.message('prices', E, 17);
  p.gap({ topic: 'prices', epoch: E, from: 18, reason: 'epoch_lost' });
  assert.equal(p.get('prices'), undefined);
  assert.equal(p.message('prices', 'new', 1).verdict.deliver, true);
  assert.deepEqual(p.get('prices'), { epoch: 'new', offset: 1 });
});
