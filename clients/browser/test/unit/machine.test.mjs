// The failover machine's transitions, ported with the machine from crates/client/src/machine.rs:
// the same cases as the Rust unit tests (same servers, same expectations), plus the property
// that the driver is asked for one thing at a time.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as sf from '../../dist/streamfarm.min.mjs';

const A = 'ws://a/stream';
const B = 'ws://b/stream';
const C = 'ws://c/stream';
const list = (servers) => ({
  servers: servers.map(([url, status, users, priority]) => ({ name: url, url, status, users, priority })),
});
const only = (url) => list([[url, 'UP', 0, 'A']]);
const machine = (retry = 'retry-once', seed = 1, extra = {}) =>
  new sf.Machine({ ...sf.DEFAULT_MACHINE_CONFIG, retry, ...extra }, sf.seededRng(seed));
const fetched = (l, via) => ({ type: 'list_fetched', list: l, via, ageMs: 0 });
const connected = (server) => ({ type: 'connected', server });
const failed = (server, elsewhere = false) => ({ type: 'connect_failed', server, error: 'refused', elsewhere });
const lost = (server, cause) => ({ type: 'lost', server, cause });
const closed = (code) => ({ kind: 'closed', code, reason: '' });
const connect = (server, reuse) => ({ type: 'connect', server, reuseListConnection: reuse, retry: false });
const retryOf = (server) => ({ type: 'connect', server, reuseListConnection: false, retry: true });
const fetch = (avoid) => ({ type: 'fetch_list', source: { kind: 'service_address', avoid } });
const servers = (urls) => ({ type: 'fetch_list', source: { kind: 'servers', urls } });
const sleepOf = (actions) => actions.find((a) => a.type === 'sleep');

function connectedTo(server, retry, t0) {
  const m = machine(retry);
  m.handle({ type: 'start' }, t0);
  m.handle(fetched(only(server), server), t0);
  m.handle(connected(server), t0);
  assert.deepEqual(m.current(), { type: 'connected', server });
  return m;
}

test('start fetches the list from the service address', () => {
  const m = machine();
  assert.deepEqual(m.handle({ type: 'start' }, 0), [fetch([])]);
  assert.deepEqual(m.current(), { type: 'fetching_list', fromServiceAddress: true, fallback: true });
});

test('a list from the picked server keeps that connection', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  assert.deepEqual(m.handle(fetched(only(A), A), 0), [connect(A, true)]);
  assert.deepEqual(m.current(), { type: 'connecting', server: A, retry: false });
});

test('a list from another server connects to the pick, then drops the first', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  const l = list([[A, 'UP', 0, 'A'], [B, 'DOWN', 0, 'A'], [C, 'UP', 5, 'B']]);
  assert.deepEqual(m.handle(fetched(l, C), 0), [connect(A, false)]);
  assert.deepEqual(m.handle(connected(A), 0), [
    { type: 'drop_list_connection' },
    { type: 'notify', notice: { type: 'connected', server: A } },
  ]);
  assert.equal(m.list().servers.length, 3);
});

test('the list server does not count this client', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  m.handle(fetched(list([[A, 'UP', 1, 'A']]), A), 0);
  assert.equal(m.list().servers[0].users, 0);
});

test('no server available drops the list connection and backs off', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  const actions = m.handle(fetched(list([[A, 'DOWN', 0, 'A']]), A), 0);
  assert.deepEqual(actions[0], { type: 'drop_list_connection' });
  assert.equal(actions[1].notice.type, 'retrying');
  const sleep = sleepOf(actions);
  assert.ok(sleep.delayMs < 100);
  assert.deepEqual(m.current(), { type: 'waiting', timer: sleep.timer });
});

test('an unreachable service address: the servers of the last list are asked', () => {
  const t0 = 0;
  const m = connectedTo(A, 'immediate', t0);
  // C is draining: no candidate on the last list, so the service address is asked first…
  m.handle({ type: 'list_updated', list: list([[A, 'UP', 1, 'A'], [C, 'DRAINING', 0, 'B']]) }, t0);
  assert.deepEqual(m.handle(lost(A, closed(1006)), t0)[1], fetch([A]));
  // …and when it gives nothing, the servers of the last list that are not DOWN.
  assert.deepEqual(m.handle({ type: 'list_failed', error: 'x' }, t0), [servers([C])]);
  assert.deepEqual(m.handle(fetched(only(C), C), t0), [connect(C, true)]);
});

test('the pick of the last list is asked first; when it fails, the service address', () => {
  const m = connectedTo(A, 'immediate', 0);
  m.handle({ type: 'list_updated', list: list([[A, 'UP', 1, 'A'], [C, 'UP', 0, 'B']]) }, 0);
  assert.deepEqual(m.handle(lost(A, closed(1006)), 0)[1], servers([C]));
  assert.deepEqual(m.handle({ type: 'list_failed', error: 'x' }, 0), [fetch([A])]);
  assert.deepEqual(m.handle({ type: 'list_failed', error: 'y' }, 0).map((a) => a.type), ['notify', 'sleep']);
});

test('a failed connect is retried once, then excluded, and the next round backs off', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  m.handle(fetched(only(B), C), 0);
  assert.deepEqual(m.handle(failed(B), 0), [{ type: 'drop_list_connection' }, retryOf(B)]);
  assert.deepEqual(m.current(), { type: 'connecting', server: B, retry: true });
  const actions = m.handle(failed(B), 0);
  assert.deepEqual(actions.map((a) => a.type), ['notify', 'sleep']);
  assert.deepEqual(m.excluded(0), [B]);
});

test('a server refusing with an elsewhere code is not retried', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  m.handle(fetched(only(B), C), 0);
  const actions = m.handle(failed(B, true), 0);
  assert.ok(!actions.some((a) => a.type === 'connect'));
  assert.deepEqual(m.excluded(0), [B]);
});

test('a retry that works reports a failover to the same server', () => {
  const m = connectedTo(A, 'retry-once', 0);
  assert.deepEqual(m.handle(lost(A, closed(1006)), 0), [
    { type: 'notify', notice: { type: 'disconnected', server: A, cause: closed(1006) } },
    retryOf(A),
  ]);
  const actions = m.handle(connected(A), 40);
  assert.deepEqual(actions[1], { type: 'notify', notice: { type: 'failed_over', from: A, to: A, tookMs: 40 } });
});

test('a lost connection whose retry fails re-requests the list at once, without the lost server', () => {
  const m = connectedTo(A, 'retry-once', 0);
  m.handle(lost(A, { kind: 'heartbeat_timeout' }), 0);
  // The first round after a good connection does not wait; A's list had only A: the address.
  assert.deepEqual(m.handle(failed(A), 0), [fetch([A])]);
  assert.deepEqual(m.excluded(0), [A]);
  const actions = m.handle(fetched(list([[A, 'UP', 0, 'A'], [B, 'UP', 100, 'A']]), B), 0);
  assert.deepEqual(actions, [connect(B, true)]);
  const done = m.handle(connected(B), 250);
  assert.ok(done.some((a) => a.notice?.type === 'failed_over' && a.notice.from === A && a.notice.to === B && a.notice.tookMs === 250));
});

test('failover asks the pick of the last list, then the others (retry once first)', () => {
  const m = machine('retry-once', 3);
  m.handle({ type: 'start' }, 0);
  m.handle(fetched(list([[A, 'UP', 0, 'A'], [B, 'UP', 0, 'A'], [C, 'UP', 0, 'A']]), A), 0);
  const first = m.current().server;
  m.handle(connected(first), 0);
  const actions = m.handle(lost(first, closed(1006)), 0);
  assert.deepEqual(actions[1], retryOf(first));
  const next = m.handle(failed(first), 0);
  assert.equal(next.length, 1);
  assert.equal(next[0].source.kind, 'servers');
  const urls = next[0].source.urls;
  assert.equal(urls.length, 2);
  assert.ok(!urls.includes(first));
  assert.deepEqual(m.current(), { type: 'fetching_list', fromServiceAddress: false, fallback: true });
  // The pick's own fresh list still shows it: it stands, on the connection the list came over.
  const pick = urls[0];
  const fresh = list([[A, 'UP', 50, 'A'], [B, 'UP', 50, 'A'], [C, 'UP', 50, 'A']]);
  fresh.servers.find((s) => s.url === pick).users = 500;
  assert.deepEqual(m.handle(fetched(fresh, pick), 0), [connect(pick, true)]);
});

test('4000 and 1001 are not retried', () => {
  for (const code of [sf.CLOSE.RECONNECT_ELSEWHERE, sf.CLOSE.GOING_AWAY]) {
    const m = connectedTo(A, 'retry-once', 0);
    const actions = m.handle(lost(A, closed(code)), 0);
    assert.deepEqual(actions[1], fetch([A]), `code ${code}`);
    assert.deepEqual(m.excluded(0), [A]);
  }
});

test('immediate mode re-requests at once without retrying', () => {
  const m = connectedTo(A, 'immediate', 0);
  assert.deepEqual(m.handle(lost(A, closed(1006)), 0)[1], fetch([A]));
  m.handle(fetched(list([[B, 'UP', 0, 'A']]), B), 0);
  assert.deepEqual(m.handle(failed(B), 0).map((a) => a.type), ['notify', 'sleep']);
});

test('the cool-down ends', () => {
  const m = connectedTo(A, 'immediate', 0);
  m.handle(lost(A, closed(sf.CLOSE.GOING_AWAY)), 0);
  const later = sf.DEFAULT_MACHINE_CONFIG.coolDownMs;
  assert.deepEqual(m.excluded(later), []);
  // Within the cool-down the service address is asked (A last); no one else is known: the round ends.
  const { timer } = sleepOf(m.handle({ type: 'list_failed', error: 'refused' }, 0));
  assert.deepEqual(m.handle({ type: 'timer_fired', timer }, later), [servers([A])]);
  assert.deepEqual(m.handle(fetched(only(A), A), later), [connect(A, true)]);
});

test('a server in its cool-down is chosen when the list has no other, and only then', () => {
  const lostA = () => {
    const m = connectedTo(A, 'immediate', 0);
    m.handle(lost(A, closed(1006)), 0);
    return m;
  };
  // A lone server that restarts answers: taken at once, not after the cool-down.
  assert.deepEqual(lostA().handle(fetched(only(A), A), 0), [connect(A, true)]);
  // Another candidate, even of a less preferred group, is taken first.
  const groups = list([[A, 'UP', 0, 'A'], [B, 'UP', 50, 'B']]);
  assert.deepEqual(lostA().handle(fetched(groups, A), 0), [connect(B, false)]);
  // Servers that are not up stay out even then.
  const down = list([[A, 'UP', 0, 'A'], [B, 'DOWN', 0, 'A']]);
  assert.deepEqual(lostA().handle(fetched(down, B), 0)[0], connect(A, false));
});

test('timers: the next round starts on its timer, stale timers are ignored', () => {
  const m = machine();
  m.handle({ type: 'start' }, 0);
  const { timer } = sleepOf(m.handle({ type: 'list_failed', error: 'x' }, 0));
  assert.deepEqual(m.handle({ type: 'timer_fired', timer: timer + 1 }, 0), []);
  assert.deepEqual(m.handle({ type: 'timer_fired', timer }, 0), [fetch([])]);
});

test('backoff grows with failed rounds, within full jitter, and resets on connect', () => {
  const backoff = { baseMs: 100, capMs: 400 };
  const m = machine('retry-once', 3, { backoff });
  m.handle({ type: 'start' }, 0);
  for (let round = 0; round < 6; round++) {
    const { delayMs, timer } = sleepOf(m.handle({ type: 'list_failed', error: 'x' }, 0));
    assert.ok(delayMs < sf.backoffCeiling(backoff, round), `round ${round}: ${delayMs}`);
    m.handle({ type: 'timer_fired', timer }, 0);
  }
  m.handle(fetched(only(A), A), 0);
  m.handle(connected(A), 0);
  m.handle(lost(A, closed(sf.CLOSE.GOING_AWAY)), 0);
  assert.deepEqual(m.current(), { type: 'fetching_list', fromServiceAddress: true, fallback: true });
  assert.deepEqual([0, 1, 3, 30].map((r) => sf.backoffCeiling({ baseMs: 100, capMs: 2000 }, r)), [100, 200, 800, 2000]);
});

test('stop closes from any state and then ignores everything', () => {
  const m = connectedTo(A, 'retry-once', 0);
  assert.deepEqual(m.handle({ type: 'stop' }, 0), [{ type: 'close' }]);
  assert.deepEqual(m.handle({ type: 'start' }, 0), []);
  const n = machine();
  n.handle({ type: 'start' }, 0);
  n.handle(fetched(list([[B, 'UP', 0, 'A']]), A), 0);
  assert.deepEqual(n.handle({ type: 'stop' }, 0), [{ type: 'drop_list_connection' }, { type: 'close' }]);
});

test('reports about other servers or states are ignored', () => {
  const m = connectedTo(A, 'retry-once', 0);
  for (const input of [
    lost(B, closed(1006)),
    connected(B),
    failed(A),
    { type: 'list_failed', error: 'x' },
    fetched(only(B), B),
    { type: 'timer_fired', timer: 0 },
    { type: 'start' },
  ]) {
    assert.deepEqual(m.handle(input, 0), [], JSON.stringify(input));
    assert.equal(m.current().type, 'connected');
  }
});

test('close codes: which send the client elsewhere', () => {
  for (const code of [4000, 1001, 4003, 1008]) assert.ok(sf.sendsElsewhere(code), code);
  for (const code of [4002, 4001, 1006, 1000]) assert.ok(!sf.sendsElsewhere(code), code);
  assert.equal(sf.describeLoss(closed(4000)), 'closed (4000)');
});

test('property: one thing at a time, no drop of a connection not held, nothing after stop', () => {
  const rng = sf.seededRng(99);
  const pickOf = (xs) => xs[Math.floor(rng() * xs.length)];
  const input = () => {
    const s = pickOf([A, B, C]);
    switch (Math.floor(rng() * 8)) {
      case 0: return { type: 'start' };
      case 1: return fetched(list([[s, pickOf(['UP', 'DOWN', 'DRAINING']), 1, 'A'], [B, 'UP', 2, 'B']]), pickOf([A, B, C]));
      case 2: return { type: 'list_failed', error: 'x' };
      case 3: return connected(s);
      case 4: return failed(s, rng() < 0.5);
      case 5: return lost(s, closed(pickOf([1006, 4000, 1001, 4002])));
      case 6: return { type: 'timer_fired', timer: Math.floor(rng() * 4) };
      default: return { type: 'stop' };
    }
  };
  for (let run = 0; run < 500; run++) {
    const m = machine(rng() < 0.5 ? 'immediate' : 'retry-once', run);
    let now = 0;
    let holding = false;
    const steps = 1 + Math.floor(rng() * 60);
    for (let i = 0; i < steps; i++) {
      now += Math.floor(rng() * 3000);
      const inp = input();
      const wasStopped = m.current().type === 'stopped';
      if (inp.type === 'list_fetched' && m.current().type === 'fetching_list') holding = true;
      const actions = m.handle(inp, now);
      if (wasStopped) assert.deepEqual(actions, []);
      const started = actions.filter((a) => ['fetch_list', 'connect', 'sleep'].includes(a.type)).length;
      assert.ok(started <= 1, JSON.stringify(actions));
      for (const a of actions) {
        if (a.type === 'drop_list_connection') {
          assert.ok(holding, 'dropped a list connection not held');
          holding = false;
        } else if (a.type === 'connect' && a.reuseListConnection) {
          assert.ok(holding, 'reused a list connection not held');
          holding = false;
        }
      }
      const s = m.current();
      const entered =
        s.type === 'waiting' ? actions.some((a) => a.type === 'sleep' && a.timer === s.timer)
        : s.type === 'fetching_list' ? actions.some((a) => a.type === 'fetch_list')
        : s.type === 'connecting' ? actions.some((a) => a.type === 'connect' && a.server === s.server)
        : true;
      assert.ok(started === 0 || entered, JSON.stringify(actions));
    }
  }
});
