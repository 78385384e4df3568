/**
 * The failover state machine, ported from `crates/client/src/machine.rs`: what a client does
 * next, as a pure function of what just happened. Same states, inputs, actions and transitions;
 * time is passed in (milliseconds), the RNG is injected.
 *
 * 1. **Round**: fetch the farm list; select a server with the policy, excluding servers that
 *    failed within the cool-down (unless the list has no other candidate); connect. When the
 *    list came over a connection to the very server picked, that connection is kept.
 * 2. **Immediate or retry once**: by default a failed connect, or a lost connection, goes
 *    straight to a new round; `retry: 'retry-once'` first tries the same server once more. A
 *    server that closes with 4000, 1001, 4003 or 1008 is never retried ({@link sendsElsewhere}).
 * 3. **Re-request**: a server that failed its retry is excluded for the cool-down and a new round
 *    starts: the client selects on its last list and asks that pick for a fresh list, then the
 *    list's other servers in a random order, then the service address. When the fresh list comes
 *    from the pick and still shows it as a candidate, the pick stands (one connection per failover).
 * 4. **Backoff**: the first round after a good connection starts at once; each further round
 *    waits a full-jitter delay, uniform in `[0, min(cap, base · 2^n))`.
 * 5. **Migration** (make-before-break): a server that asks its client to move (`migrate_asked`)
 *    names where, or leaves it to the policy (without the asking server). The machine asks for a
 *    `migrate` action — a second connection, subscribed from the held positions while the first
 *    keeps delivering — and is connected to the new server once the driver reports it caught up
 *    (`migrated`). A migration whose connection fails leaves the client where it was, with the
 *    target excluded; losing the old server meanwhile makes the migration's connection the
 *    failover's.
 */
import { type FarmList, type Rng, shuffle } from './model.js';
import { type Context, type Policy, candidates, choose, reconnectingContext } from './selection.js';

/** Close codes of `docs/PROTOCOL.md` section 6. */
export const CLOSE = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  RECONNECT_ELSEWHERE: 4000,
  SLOW_CONSUMER: 4001,
  HEARTBEAT_TIMEOUT: 4002,
  SERVER_FULL: 4003,
  /** Tokens (`docs/AUTH.md`): none came, not valid, expired, valid but not allowing it. */
  AUTH_MISSING: 4010,
  AUTH_INVALID: 4011,
  AUTH_EXPIRED: 4012,
  AUTH_FORBIDDEN: 4013,
} as const;

/** Whether a close code sends the client to another server rather than a retry of this one. */
export function sendsElsewhere(code: number): boolean {
  return (
    code === CLOSE.RECONNECT_ELSEWHERE ||
    code === CLOSE.GOING_AWAY ||
    code === CLOSE.SERVER_FULL ||
    code === CLOSE.POLICY_VIOLATION
  );
}

/** Exponential backoff with full jitter, capped (`crates/client/src/backoff.rs`). */
export interface Backoff {
  baseMs: number;
  capMs: number;
}

/** The window before round `round`: `min(cap, base · 2^round)`. */
export function backoffCeiling(b: Backoff, round: number): number {
  return Math.min(b.baseMs * 2 ** Math.min(round, 31), b.capMs);
}

/** A delay uniform in `[0, ceiling(round))`. */
export function backoffDelay(b: Backoff, round: number, rng: Rng): number {
  const ceiling = backoffCeiling(b, round);
  return ceiling <= 0 ? 0 : Math.floor(rng() * ceiling);
}

/** What to do when a connect fails or a connection is lost. */
export type RetryMode = 'retry-once' | 'immediate';

/** The knobs of the machine. */
export interface MachineConfig {
  policy: Policy;
  retry: RetryMode;
  /** How long a server that failed stays excluded, ms. */
  coolDownMs: number;
  backoff: Backoff;
}

/** The defaults of the Rust client: weighted, immediate, 10 s cool-down, 100 ms doubling to 5 s. */
export const DEFAULT_MACHINE_CONFIG: MachineConfig = {
  policy: 'weighted',
  retry: 'immediate',
  coolDownMs: 10_000,
  backoff: { baseMs: 100, capMs: 5_000 },
};

/** Why an established connection ended. */
export type LossCause =
  | { kind: 'closed'; code: number; reason: string }
  | { kind: 'heartbeat_timeout' }
  | { kind: 'broken'; detail: string };

/** Renders a loss cause as the Rust client does. */
export function describeLoss(cause: LossCause): string {
  switch (cause.kind) {
    case 'closed':
      return cause.reason ? `closed (${cause.code}: ${cause.reason})` : `closed (${cause.code})`;
    case 'heartbeat_timeout':
      return 'heartbeat timeout';
    case 'broken':
      return `broken (${cause.detail})`;
  }
}

/** Where a list is to be fetched from. */
export type ListSource =
  | { kind: 'service_address'; avoid: string[] }
  | { kind: 'servers'; urls: string[] };

/** Something that happened, reported by the driver. */
export type Input =
  | { type: 'start' }
  | { type: 'list_fetched'; list: FarmList; via: string; ageMs: number }
  | { type: 'list_failed'; error: string }
  | { type: 'list_updated'; list: FarmList }
  | { type: 'connected'; server: string; list?: FarmList }
  | { type: 'connect_failed'; server: string; error: string; elsewhere: boolean }
  | { type: 'lost'; server: string; cause: LossCause }
  /** The connected server asked the client to move (a `migrate` frame): to `to`, or anywhere else. */
  | { type: 'migrate_asked'; server: string; to?: string; reason: string }
  /** The migration's new connection caught up and the old one is closed. */
  | { type: 'migrated'; server: string }
  | { type: 'timer_fired'; timer: number }
  | { type: 'stop' };

/** What the application is told. */
export type Notice =
  | { type: 'connected'; server: string }
  | { type: 'disconnected'; server: string; cause: LossCause }
  | { type: 'failed_over'; from: string; to: string; tookMs: number }
  /** Moved from `from` to `to` at `from`'s request, make-before-break; `tookMs` from the request. */
  | { type: 'migrated'; from: string; to: string; reason: string; tookMs: number }
  /** A migration's new connection failed: the client stays on `server`. */
  | { type: 'migration_failed'; server: string; to: string; error: string }
  | { type: 'retrying'; reason: string; delayMs: number };

/** Something for the driver to do. */
export type Action =
  | { type: 'fetch_list'; source: ListSource }
  | { type: 'connect'; server: string; reuseListConnection: boolean; retry: boolean }
  /** Connect to `server` and subscribe from the held positions while the old connection keeps
   * delivering; report `migrated` once caught up and the old one closed, or `connect_failed`. */
  | { type: 'migrate'; server: string }
  | { type: 'drop_list_connection' }
  | { type: 'sleep'; delayMs: number; timer: number }
  | { type: 'notify'; notice: Notice }
  | { type: 'close' };

/** Where the machine is. */
export type State =
  | { type: 'idle' }
  | { type: 'fetching_list'; fromServiceAddress: boolean; fallback: boolean }
  | { type: 'connecting'; server: string; retry: boolean }
  | { type: 'connected'; server: string }
  /** Connected to `from`, connecting to `to` to move there. */
  | { type: 'migrating'; from: string; to: string; reason: string; since: number }
  | { type: 'waiting'; timer: number }
  | { type: 'stopped' };

/** The failover state machine (see the module documentation). */
export class Machine {
  private state: State = { type: 'idle' };
  private lastList: FarmList | undefined;
  /** Servers that failed, with the end of their cool-down (ms). */
  private excludedUntil: Array<[string, number]> = [];
  /** Failed rounds since the last good connection. */
  private round = 0;
  /** The server lost and when, until connected again. */
  private away: [string, number] | undefined;
  private holdingListConnection = false;
  /** The pick of the last list that was asked for a new one. */
  private asked: string | undefined;
  private nextTimer = 0;

  constructor(
    readonly config: MachineConfig,
    private readonly rng: Rng,
  ) {}

  /** The current state. */
  current(): State {
    return this.state;
  }

  /** The most recent farm list, if any arrived. */
  list(): FarmList | undefined {
    return this.lastList;
  }

  /** Servers excluded from selection at `now`. */
  excluded(now: number): string[] {
    return this.excludedUntil.filter(([, until]) => until > now).map(([url]) => url);
  }

  /**
   * The servers selection on `list` leaves out at `now`: those excluded, unless that leaves `list`
   * no candidate, when none is. A cool-down steers a client away from a failed server while
   * another can take it; it never keeps a client from the only servers it has (a lone server
   * that restarts): those are tried again, paced by the backoff.
   */
  private excludedOn(list: FarmList, now: number): string[] {
    const exclude = this.excluded(now);
    if (exclude.length === 0) return exclude;
    try {
      candidates(list, exclude);
      return exclude;
    } catch {
      return [];
    }
  }

  /** Takes in what happened at `now` (ms) and returns what to do, in order. */
  handle(input: Input, now: number): Action[] {
    this.excludedUntil = this.excludedUntil.filter(([, until]) => until > now);
    const actions: Action[] = [];
    const state = this.state;
    this.state = { type: 'stopped' };
    if (state.type === 'stopped') return actions;
    if (input.type === 'stop') {
      this.dropListConnection(actions);
      actions.push({ type: 'close' });
      return actions;
    }
    if (input.type === 'list_updated') {
      this.lastList = input.list;
      this.state = state;
      return actions;
    }
    if (state.type === 'idle' && input.type === 'start') {
      this.nextRound(undefined, now, actions);
    } else if (state.type === 'fetching_list' && input.type === 'list_fetched') {
      this.holdingListConnection = true;
      // The list server counts the connection the list came over among its users; that user is
      // this client, which has not chosen yet.
      const list: FarmList = {
        ...input.list,
        servers: input.list.servers.map((s) =>
          s.url === input.via ? { ...s, users: Math.max(0, s.users - 1) } : s,
        ),
      };
      this.select(list, input.via, input.ageMs, now, actions);
    } else if (state.type === 'fetching_list' && state.fallback && input.type === 'list_failed') {
      // The pick did not answer: whatever list comes next is selected on afresh.
      this.asked = undefined;
      if (state.fromServiceAddress) {
        const others = this.otherServers(now);
        if (others.length === 0) {
          this.nextRound(input.error, now, actions);
        } else {
          this.state = { type: 'fetching_list', fromServiceAddress: false, fallback: false };
          actions.push({ type: 'fetch_list', source: { kind: 'servers', urls: others } });
        }
      } else {
        this.fetchFromServiceAddress(false, now, actions);
      }
    } else if (state.type === 'fetching_list' && !state.fallback && input.type === 'list_failed') {
      this.nextRound(input.error, now, actions);
    } else if (state.type === 'connecting' && input.type === 'connected' && input.server === state.server) {
      this.dropListConnection(actions);
      if (input.list) this.lastList = input.list;
      this.round = 0;
      actions.push({ type: 'notify', notice: { type: 'connected', server: state.server } });
      if (this.away) {
        const [from, since] = this.away;
        this.away = undefined;
        actions.push({
          type: 'notify',
          notice: { type: 'failed_over', from, to: state.server, tookMs: Math.max(0, now - since) },
        });
      }
      this.state = { type: 'connected', server: state.server };
    } else if (state.type === 'connecting' && input.type === 'connect_failed' && input.server === state.server) {
      // A reused list connection is gone with the failure; any other is no use now.
      this.dropListConnection(actions);
      if (!state.retry && !input.elsewhere && this.config.retry === 'retry-once') {
        actions.push({ type: 'connect', server: state.server, reuseListConnection: false, retry: true });
        this.state = { type: 'connecting', server: state.server, retry: true };
      } else {
        this.exclude(state.server, now);
        this.nextRound(`${state.server}: ${input.error}`, now, actions);
      }
    } else if (state.type === 'connected' && input.type === 'lost' && input.server === state.server) {
      const server = state.server;
      this.away = [server, now];
      actions.push({ type: 'notify', notice: { type: 'disconnected', server, cause: input.cause } });
      const elsewhere = input.cause.kind === 'closed' && sendsElsewhere(input.cause.code);
      if (elsewhere || this.config.retry === 'immediate') {
        this.exclude(server, now);
        this.nextRound(undefined, now, actions);
      } else {
        actions.push({ type: 'connect', server, reuseListConnection: false, retry: true });
        this.state = { type: 'connecting', server, retry: true };
      }
    } else if (state.type === 'connected' && input.type === 'migrate_asked' && input.server === state.server) {
      const to = this.migrationTarget(state.server, input.to, now);
      if (to === undefined) {
        // Nowhere to go: stay; the server closes the connection at its deadline and the failover
        // takes over then.
        this.state = state;
      } else {
        actions.push({ type: 'migrate', server: to });
        this.state = { type: 'migrating', from: state.server, to, reason: input.reason, since: now };
      }
    } else if (state.type === 'migrating' && input.type === 'migrated' && input.server === state.to) {
      this.round = 0;
      const { from, to, reason } = state;
      actions.push({ type: 'notify', notice: { type: 'migrated', from, to, reason, tookMs: Math.max(0, now - state.since) } });
      this.state = { type: 'connected', server: to };
    } else if (state.type === 'migrating' && input.type === 'connect_failed' && input.server === state.to) {
      this.exclude(state.to, now);
      actions.push({
        type: 'notify',
        notice: { type: 'migration_failed', server: state.from, to: state.to, error: input.error },
      });
      this.state = { type: 'connected', server: state.from };
    } else if (state.type === 'migrating' && input.type === 'lost' && input.server === state.from) {
      // The old connection ended before the new one was up: the migration's connect goes on as
      // the failover's.
      this.away = [state.from, now];
      this.exclude(state.from, now);
      actions.push({ type: 'notify', notice: { type: 'disconnected', server: state.from, cause: input.cause } });
      this.state = { type: 'connecting', server: state.to, retry: false };
    } else if (state.type === 'waiting' && input.type === 'timer_fired' && input.timer === state.timer) {
      this.requestList(now, actions);
    } else {
      // Stale (a superseded timer, a report about a connection the machine has left) or
      // impossible: ignore it, stay put.
      this.state = state;
    }
    return actions;
  }

  private select(list: FarmList, via: string, ageMs: number, now: number, actions: Action[]): void {
    const exclude = this.excludedOn(list, now);
    const asked = this.asked === via ? this.asked : undefined;
    this.asked = undefined;
    let index: number | undefined;
    let failure: string | undefined;
    if (asked !== undefined) {
      try {
        index = candidates(list, exclude).indices.find((i) => list.servers[i]!.url === asked);
      } catch {
        index = undefined;
      }
    }
    if (index === undefined) {
      try {
        index = choose(this.config.policy, list, exclude, this.rng, this.context(list, ageMs)).index;
      } catch (err) {
        failure = (err as Error).message;
      }
    }
    if (index !== undefined) {
      const server = list.servers[index]!.url;
      const reuse = server === via;
      // The connection now belongs to the connect; the driver no longer holds it.
      if (reuse) this.holdingListConnection = false;
      actions.push({ type: 'connect', server, reuseListConnection: reuse, retry: false });
      this.state = { type: 'connecting', server, retry: false };
    } else {
      this.dropListConnection(actions);
      this.nextRound(failure, now, actions);
    }
    this.lastList = list;
  }

  private context(list: FarmList, ageMs: number): Context {
    if (this.away) {
      return reconnectingContext(list, this.away[0], ageMs / 1000, this.config.backoff.baseMs / 1000);
    }
    return { listAgeS: ageMs / 1000 };
  }

  private nextRound(failure: string | undefined, now: number, actions: Action[]): void {
    const round = this.round;
    this.round += 1;
    if (round === 0) {
      this.requestList(now, actions);
      return;
    }
    const delayMs = backoffDelay(this.config.backoff, round - 1, this.rng);
    const timer = this.nextTimer++;
    actions.push({
      type: 'notify',
      notice: { type: 'retrying', reason: failure ?? 'no server reached', delayMs },
    });
    actions.push({ type: 'sleep', delayMs, timer });
    this.state = { type: 'waiting', timer };
  }

  private requestList(now: number, actions: Action[]): void {
    const exclude = this.excluded(now);
    let pick: string | undefined;
    if (this.lastList) {
      try {
        const list = this.lastList;
        pick = list.servers[choose(this.config.policy, list, exclude, this.rng, this.context(list, 0)).index]!.url;
      } catch {
        pick = undefined;
      }
    }
    if (pick === undefined) {
      this.asked = undefined;
      this.fetchFromServiceAddress(true, now, actions);
      return;
    }
    // Clients whose pick does not answer spread over the rest rather than all asking the first.
    const others = shuffle(
      this.otherServers(now).filter((url) => url !== pick),
      this.rng,
    );
    this.asked = pick;
    actions.push({ type: 'fetch_list', source: { kind: 'servers', urls: [pick, ...others] } });
    this.state = { type: 'fetching_list', fromServiceAddress: false, fallback: true };
  }

  private fetchFromServiceAddress(fallback: boolean, now: number, actions: Action[]): void {
    actions.push({ type: 'fetch_list', source: { kind: 'service_address', avoid: this.excluded(now) } });
    this.state = { type: 'fetching_list', fromServiceAddress: true, fallback };
  }

  /** Servers of the last list that may answer a list request: not `DOWN`, not excluded. */
  private otherServers(now: number): string[] {
    const exclude = this.excluded(now);
    return (this.lastList?.servers ?? [])
      .filter((s) => s.status !== 'DOWN' && !exclude.includes(s.url))
      .map((s) => s.url);
  }

  /** Where to move from `from`: the server named, unless the client just failed to reach it;
   * else the policy's pick on the last list, without `from`. */
  private migrationTarget(from: string, to: string | undefined, now: number): string | undefined {
    const exclude = this.excluded(now);
    if (to !== undefined && to !== from && !exclude.includes(to)) return to;
    exclude.push(from);
    const list = this.lastList;
    if (!list) return undefined;
    try {
      return list.servers[choose(this.config.policy, list, exclude, this.rng).index]?.url;
    } catch {
      return undefined;
    }
  }

  private exclude(server: string, now: number): void {
    this.excludedUntil = this.excludedUntil.filter(([url]) => url !== server);
    this.excludedUntil.push([server, now + this.config.coolDownMs]);
  }

  private dropListConnection(actions: Action[]): void {
    if (this.holdingListConnection) {
      this.holdingListConnection = false;
      actions.push({ type: 'drop_list_connection' });
    }
  }
}
