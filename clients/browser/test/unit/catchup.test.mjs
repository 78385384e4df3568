// When a move's new connection takes over (docs/CLIENT.md, Migration): once the old connection has
// delivered every subscribed topic up to where the new one starts — as the Rust client's catch_up.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Positions, catchUp, sseUrl } from '../../dist/streamfarm.min.mjs';

const E = '0000019ad1a0b2e7';
const at = (offset, epoch = E) => ({ epoch, offset });

test('the old connection has caught up once every subscribed topic reached the new start', () => {
  const p = new Positions();
  const subscribed = new Set(['a', 'b']);
  p.message('a', E, 10);
  p.message('b', E, 3);
  assert.equal(catchUp(p, subscribed, { a: at(12), b: at(3) }), 'waiting');
  p.message('a', E, 11);
  assert.equal(catchUp(p, subscribed, { a: at(12), b: at(3) }), 'waiting');
  p.message('a', E, 12);
  assert.equal(catchUp(p, subscribed, { a: at(12), b: at(3) }), 'done');
  // Past it is caught up too.
  assert.equal(catchUp(p, subscribed, { a: at(11) }), 'done');
});

test('topics not subscribed, or starting before their first message, are not waited for', () => {
  const p = new Positions();
  assert.equal(catchUp(p, new Set(['a']), { a: at(0), other: at(9) }), 'done');
  assert.equal(catchUp(p, new Set(['a']), { a: at(1) }), 'waiting', 'nothing held yet: waiting');
});

test('another epoch is never reached by the old connection', () => {
  const p = new Positions();
  p.message('a', E, 40);
  assert.equal(catchUp(p, new Set(['a']), { a: at(2, '0000019ad1a0ffff') }), 'never');
});

test("a server's event stream is its streaming url with http and /sse", () => {
  assert.equal(sseUrl('ws://127.0.0.1:7400/stream').toString(), 'http://127.0.0.1:7400/sse');
  assert.equal(sseUrl('wss://a.example/stream?x=1').toString(), 'https://a.example/sse');
});
