/**
 * The browser client: a thin driver around the pure {@link Machine} (failover) and
 * {@link Positions} (recovery). It owns the sockets, the timers and the events; every decision
 * about where to connect next is the machine's.
 *
 * ```js
 * const client = new streamfarm.Client({ seeds: ['https://a.farm.example', 'https://b.farm.example'] });
 * const prices = client.subscribe('prices');
 * prices.on('message', (m) => console.log(m.data));
 * client.on('failover', (f) => console.log(`moved ${f.from} → ${f.to} in ${f.tookMs} ms`));
 * client.start();
 * ```
 */
import { type FarmList, type Rng, shuffle } from './model.js';
import {
  type Action,
  type Backoff,
  CLOSE,
  DEFAULT_MACHINE_CONFIG,
  type Input,
  type ListSource,
  type LossCause,
  Machine,
  type RetryMode,
  type State,
  describeLoss as describe,
  sendsElsewhere,
} from './machine.js';
import { encodeEventId } from './eventid.js';
import { type Gap, type Position, Positions, type Recovery } from './positions.js';
import type { Policy } from './selection.js';
import { DEFAULT_STREAM_PATH, hostOf, seedBase } from './address.js';
import {
  Connection,
  type Frame,
  MAX_HELD_BYTES,
  MAX_HELD_FRAMES,
  OpenError,
  type SseRequest,
  SseConnection,
  type Transport,
  WsConnection,
} from './connection.js';
import { refreshDelayMs, tokenExpiry } from './token.js';

/** Options of a {@link Client}; only `seeds` is required. */
export interface ClientOptions {
  /**
   * The service address: node base URLs (`https://a.example`, `http://127.0.0.1:7400`), `host:port`
   * or streaming urls, as an array or one comma-separated string. Tried in a random order.
   */
  seeds: string | string[];
  /** Topics to subscribe from the start. */
  topics?: string[];
  /** Selection policy (default `weighted`; `patent` names it too). */
  policy?: Policy;
  /** `immediate` (default: re-request the list at once) or `retry-once` (the same server once more first). */
  retry?: RetryMode;
  /** How long a failed server stays excluded, ms (default 10 000). */
  coolDownMs?: number;
  /** Full-jitter backoff between failed rounds (default 100 ms doubling to 5 s). */
  backoff?: Backoff;
  /** Connect timeout (open + `hello` + `farm`), ms (default 3000). */
  connectTimeoutMs?: number;
  /**
   * The transports to use, in order of preference (default both: `['websocket', 'sse']`). A
   * WebSocket that gets no answer falls back to server-sent events (see `docs/CLIENT.md`).
   */
  transports?: Transport[];
  /** How long a WebSocket may take to open and greet before the event stream is tried, ms
   * (default 1500). */
  webSocketTimeoutMs?: number;
  /** Connect timeout of the one retry of a server just lost, ms (default 250). */
  retryTimeoutMs?: number;
  /** How long to wait for `subscribed`, ms (default 3000). */
  subscribeTimeoutMs?: number;
  /** `GET /farm` timeout per seed, ms (default 2000). */
  listTimeoutMs?: number;
  /** Give a silent server up after this long, ms (default: the node's `heartbeat_timeout_ms`). */
  heartbeatTimeoutMs?: number;
  /** Ask for the list instead of a ping when it is older than this, ms (default 5000; 0: never). */
  listRefreshMs?: number;
  /** Be pushed the farm list whenever the farm's membership changes (`{"type":"list","watch":true}`:
   * a server joins, leaves, changes status); users are refreshed every `listRefreshMs`. Default false. */
  watchList?: boolean;
  /** With `watchList`: be pushed every change of the list, users included (`"users":true`); for
   * a dashboard. Default false. */
  watchUsers?: boolean;
  /**
   * The connection token (a JWT, `docs/AUTH.md`). Called before each WebSocket is opened; its
   * answer travels as the `token` query parameter (browsers cannot set headers on a WebSocket).
   * Called again before the token expires (30 s before its `exp`, or half-way through a token
   * that lives less than a minute), and the fresh token is sent in a `refresh` frame, so the
   * connection outlives its first token. Nodes that check no tokens ignore it.
   */
  getToken?: () => string | undefined | Promise<string | undefined>;
  /** Random numbers in `[0, 1)` (default `Math.random`). */
  rng?: Rng;
  /** Start at once (default true). */
  autoStart?: boolean;
}

/** A message received on a topic. */
export interface Message {
  topic: string;
  /** The payload (base64 when `encoding` is `base64`). */
  data: string;
  encoding?: 'utf8' | 'base64';
  /** The message's position, when the node sends positions. */
  epoch?: string;
  offset?: number;
  /** Replayed after a resubscription (it was published while the client was away). */
  recovered: boolean;
}

/** The state of one subscription. */
export type SubscriptionState = 'subscribing' | 'subscribed' | 'unsubscribed';

/** The events of a {@link Client}, by name. */
export interface ClientEvents {
  /** Connected and subscribed to `server`, over `transport`. */
  connected: { server: string; transport: Transport };
  /** The connection to `server` ended. */
  disconnected: { server: string; cause: LossCause; reason: string };
  /** Connected again after a loss (`to` may equal `from` when the retry worked). */
  failover: { from: string; to: string; tookMs: number; transport: Transport };
  /** The session's transport changed: `sse` after a WebSocket got no answer, `websocket` when it
   * is allowed again (tried after each failover). */
  transport: { server: string; transport: Transport; reason: string };
  /** Moved from `from` to `to` at `from`'s request, make-before-break (nothing lost, nothing twice). */
  migrated: { from: string; to: string; reason: string; tookMs: number; transport: Transport };
  /** A migration's new connection failed: the client stays on `server`. */
  migrationFailed: { server: string; to: string; error: string };
  /** A round found no server; the next starts after `delayMs`. */
  retrying: { reason: string; delayMs: number };
  /** A farm list arrived (`hello`'s, a refresh, or a watched change). `ageMs`: since the node made it. */
  farm: { list: FarmList; ageMs: number; via: string };
  /** A message on any subscribed topic. */
  message: Message;
  /** A topic's recovery after a resubscription is complete. */
  recovered: Recovery;
  /** Messages of a topic that could not be recovered. */
  gap: Gap;
  /** Resubscribed after a loss to a node that sends no positions: messages may be missing. */
  maybeMissed: { topics: string[]; awayMs: number };
  /** A subscription changed state. */
  subscription: { topic: string; state: SubscriptionState };
  /** The node answered with an `error` frame. */
  error: { code: string; message: string };
  /** The machine moved (for tests and diagnostics): what it was told and what it asked for. */
  transition: { input: Input['type']; state: State; actions: Action[] };
}

type Listener<T> = (event: T) => void;

/** A minimal typed event emitter. */
export class Emitter<E extends object> {
  private listeners: { [K in keyof E]?: Array<Listener<E[K]>> } = {};

  /** Calls `listener` on each `name` event; returns the function that stops it. */
  on<K extends keyof E>(name: K, listener: Listener<E[K]>): () => void {
    (this.listeners[name] ??= []).push(listener);
    return () => this.off(name, listener);
  }

  /** Stops calling `listener`. */
  off<K extends keyof E>(name: K, listener: Listener<E[K]>): void {
    this.listeners[name] = this.listeners[name]?.filter((l) => l !== listener);
  }

  protected emit<K extends keyof E>(name: K, event: E[K]): void {
    for (const l of this.listeners[name] ?? []) {
      try {
        l(event);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

/** The events of one {@link Subscription}. */
export interface SubscriptionEvents {
  message: Message;
  state: SubscriptionState;
  recovered: Recovery;
  gap: Gap;
}

/** One topic of a client: its state and its events. */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** Where the subscription stands. */
  state: SubscriptionState = 'subscribing';

  constructor(
    readonly topic: string,
    private readonly client: Client,
  ) {
    super();
  }

  /** Stops the subscription. */
  unsubscribe(): void {
    this.client.unsubscribe(this.topic);
  }

  /** The last position received, when the node sends positions. */
  position(): Position | undefined {
    return this.client.position(this.topic);
  }

  /** @internal */
  _emit<K extends keyof SubscriptionEvents>(name: K, event: SubscriptionEvents[K]): void {
    if (name === 'state') this.state = event as SubscriptionState;
    this.emit(name, event);
  }
}

/** Longest a move waits for the old connection to catch up with the new one. */
const CATCH_UP_MS = 5000;

/** A move's new connection once subscribed, until it takes over from the old one. */
interface Arriving {
  conn: Connection;
  server: string;
  kind: 'migration' | 'upgrade';
  /** What it sent since subscribing (`subscribed` first), taken once it takes over. */
  held: Frame[];
  /** Per topic, the position its live delivery starts after. */
  until: Record<string, Position>;
  /** It takes over then, caught up or not. */
  timer: ReturnType<typeof setTimeout>;
}

/**
 * Whether the client has everything up to `until`, a move's new connection's start: `done`,
 * `waiting`, or `never` (a topic moved to another epoch: the old connection will not get there).
 * As the Rust client's `catch_up`.
 */
export function catchUp(
  positions: Positions,
  subscribed: { has(topic: string): boolean },
  until: Record<string, Position>,
): 'done' | 'waiting' | 'never' {
  let state: 'done' | 'waiting' = 'done';
  for (const [topic, start] of Object.entries(until)) {
    if (!subscribed.has(topic) || start.offset === 0) continue;
    const held = positions.get(topic);
    if (held && held.epoch !== start.epoch) return 'never';
    if (!held || held.offset < start.offset) state = 'waiting';
  }
  return state;
}

/**
 * The streamfarm browser client. Create it with the service address (a seed list); it fetches
 * the farm list, picks its server with the policy, subscribes, keeps heartbeats, and fails over
 * by the transitions of the Rust client.
 */
export class Client extends Emitter<ClientEvents> {
  private readonly machine: Machine;
  private readonly positions = new Positions();
  private readonly subs = new Map<string, Subscription>();
  private readonly seeds: string[];
  private readonly rng: Rng;
  private active: Connection | undefined;
  /** The token the last connection was opened with. */
  private token: string | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private listConn: Connection | undefined;
  private timers = new Map<number, ReturnType<typeof setTimeout>>();
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private awaySince: number | undefined;
  private stopped = false;
  private readonly announced = new Set<string>();
  private readonly transports: Transport[];
  /** The transport of this session: WebSocket until one gets no answer. */
  private transportInUse: Transport;
  /** A move's new connection, subscribed, while the old one catches up with it. */
  private arriving: Arriving | undefined;
  private readonly onOnline = () => this.wakeUp();

  constructor(readonly options: ClientOptions) {
    super();
    const seeds = typeof options.seeds === 'string' ? options.seeds.split(',') : options.seeds;
    this.seeds = seeds.filter((s) => s.trim()).map(seedBase);
    if (this.seeds.length === 0) throw new Error('streamfarm: no seed in the service address');
    this.rng = options.rng ?? Math.random;
    this.transports = options.transports?.length ? options.transports : ['websocket', 'sse'];
    this.transportInUse = this.transports[0]!;
    this.machine = new Machine(
      {
        policy: options.policy ?? DEFAULT_MACHINE_CONFIG.policy,
        retry: options.retry ?? DEFAULT_MACHINE_CONFIG.retry,
        coolDownMs: options.coolDownMs ?? DEFAULT_MACHINE_CONFIG.coolDownMs,
        backoff: options.backoff ?? DEFAULT_MACHINE_CONFIG.backoff,
      },
      this.rng,
    );
    for (const t of options.topics ?? []) this.subscribe(t);
    if (options.autoStart ?? true) queueMicrotask(() => this.start());
  }

  /** Starts the client (once). */
  start(): void {
    if (this.machine.current().type !== 'idle') return;
    if (typeof window !== 'undefined') window.addEventListener('online', this.onOnline);
    this.feed({ type: 'start' });
  }

  /** Stops the client for good and closes its connections. */
  stop(): void {
    this.stopped = true;
    if (typeof window !== 'undefined') window.removeEventListener('online', this.onOnline);
    this.feed({ type: 'stop' });
    this.cancelUpgrade();
    this.active?.close();
    this.active = undefined;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    this.stopHeartbeat();
  }

  /** The machine's state. */
  state(): State {
    return this.machine.current();
  }

  /** The url of the server connected to, if any. */
  server(): string | undefined {
    const s = this.machine.current();
    if (s.type === 'migrating') return s.from;
    return s.type === 'connected' ? s.server : undefined;
  }

  /** How the client streams now (`undefined` while not connected). */
  transport(): Transport | undefined {
    return this.active?.transport;
  }

  /** The most recent farm list. */
  farm(): FarmList | undefined {
    return this.machine.list();
  }

  /** The last position received on `topic`, when the node sends positions. */
  position(topic: string): Position | undefined {
    return this.positions.get(topic);
  }

  /** Subscribes to `topic` (idempotent); the subscription follows the client across failovers. */
  subscribe(topic: string): Subscription {
    let sub = this.subs.get(topic);
    if (sub) return sub;
    sub = new Subscription(topic, this);
    this.subs.set(topic, sub);
    this.setSubState(topic, 'subscribing');
    if (this.active && this.machine.current().type === 'connected') this.sendSub(this.active, [topic]);
    return sub;
  }

  /** Stops receiving `topic`. */
  unsubscribe(topic: string): void {
    if (!this.subs.has(topic)) return;
    this.active?.send({ type: 'unsub', topics: [topic] });
    this.setSubState(topic, 'unsubscribed');
    this.subs.delete(topic);
    this.announced.delete(topic);
    this.positions.forget(topic);
  }

  /** Publishes over the connection (when the node allows client publishing); false when not connected. */
  publish(topic: string, data: string): boolean {
    if (!this.active || !this.server()) return false;
    this.active.send({ type: 'pub', topic, data });
    return true;
  }

  /** Ends a backoff wait now (the browser came back `online`). */
  wakeUp(): void {
    const s = this.machine.current();
    if (s.type !== 'waiting') return;
    clearTimeout(this.timers.get(s.timer));
    this.timers.delete(s.timer);
    this.feed({ type: 'timer_fired', timer: s.timer });
  }

  private feed(input: Input): void {
    const actions = this.machine.handle(input, Date.now());
    this.emit('transition', { input: input.type, state: this.machine.current(), actions });
    for (const a of actions) this.perform(a);
  }

  private perform(action: Action): void {
    switch (action.type) {
      case 'fetch_list':
        void this.fetchList(action.source);
        break;
      case 'connect':
        void this.connect(action.server, action.reuseListConnection, action.retry);
        break;
      case 'migrate':
        this.cancelUpgrade();
        void this.moveTo(action.server, 'migration');
        break;
      case 'drop_list_connection':
        this.listConn?.close();
        this.listConn = undefined;
        break;
      case 'sleep': {
        const t = setTimeout(() => {
          this.timers.delete(action.timer);
          this.feed({ type: 'timer_fired', timer: action.timer });
        }, action.delayMs);
        this.timers.set(action.timer, t);
        break;
      }
      case 'notify': {
        const n = action.notice;
        const transport = this.active?.transport ?? this.transportInUse;
        if (n.type === 'connected') this.emit('connected', { server: n.server, transport });
        else if (n.type === 'disconnected')
          this.emit('disconnected', { server: n.server, cause: n.cause, reason: describe(n.cause) });
        else if (n.type === 'failed_over') this.emit('failover', { from: n.from, to: n.to, tookMs: n.tookMs, transport });
        else if (n.type === 'retrying') this.emit('retrying', { reason: n.reason, delayMs: n.delayMs });
        else if (n.type === 'migrated')
          this.emit('migrated', { from: n.from, to: n.to, reason: n.reason, tookMs: n.tookMs, transport });
        else if (n.type === 'migration_failed') this.emit('migrationFailed', { server: n.server, to: n.to, error: n.error });
        break;
      }
      case 'close':
        this.cancelUpgrade();
        this.active?.close();
        this.active = undefined;
        this.listConn?.close();
        this.listConn = undefined;
        break;
    }
  }

  /** Drops a move's new connection that has not taken over (an upgrade that a migration or the
   * end of the client overtakes). */
  private cancelUpgrade(): void {
    const a = this.arriving;
    if (!a) return;
    this.arriving = undefined;
    clearTimeout(a.timer);
    a.conn.close();
  }

  private async wsUrl(server: string): Promise<string> {
    const token = await this.options.getToken?.();
    this.token = token;
    if (!token) return server;
    const url = new URL(server);
    url.searchParams.set('token', token);
    return url.toString();
  }

  private async fetchList(source: ListSource): Promise<void> {
    let error = 'no seed answered';
    // An event-stream session asks `GET /farm`: its WebSockets get no answer.
    const overWebSocket = this.transportInUse === 'websocket';
    if (source.kind === 'service_address') {
      const avoid = new Set(source.avoid.map(hostOf));
      const order = shuffle([...this.seeds], this.rng);
      const seeds = [...order.filter((s) => !avoid.has(hostOf(s))), ...order.filter((s) => avoid.has(hostOf(s)))];
      for (const seed of seeds) {
        if (this.stopped) return;
        const failure = await this.listOverHttp(seed);
        if (failure === true) return;
        error = failure;
        if (!overWebSocket) continue;
        // A node that does not allow this page's origin to read /farm (CORS), or answers it
        // badly, still greets a WebSocket with the list (WebSockets are not subject to CORS):
        // the first contact of the Rust client.
        const wsFailure = await this.listOverWebSocket(seed.replace(/^http/, 'ws') + DEFAULT_STREAM_PATH);
        if (wsFailure === true) return;
        error += `; ${wsFailure}`;
      }
    } else {
      for (const url of source.urls) {
        if (this.stopped) return;
        const failure = overWebSocket ? await this.listOverWebSocket(url) : await this.listOverHttp(seedBase(url));
        if (failure === true) return;
        error = failure;
      }
    }
    if (!this.stopped) this.feed({ type: 'list_failed', error });
  }

  /** `GET /farm` of `base` and reports the list; true when it did, else why not. */
  private async listOverHttp(base: string): Promise<true | string> {
    try {
      const list = await this.getFarm(base);
      if (this.stopped) return true;
      const ageMs = list.generated_at_ms ? Math.max(0, Date.now() - list.generated_at_ms) : 0;
      this.emit('farm', { list, ageMs, via: base });
      // No connection is held: `via` names the seed, which no server url matches.
      this.feed({ type: 'list_fetched', list, via: `${base}/farm`, ageMs });
      return true;
    } catch (err) {
      return `${base}: ${(err as Error).message}`;
    }
  }

  /**
   * Opens `url` for its `hello` + `farm` and reports the list, holding the connection for the
   * machine; true when it did, else why not.
   */
  private async listOverWebSocket(url: string): Promise<true | string> {
    try {
      const conn = await WsConnection.open(await this.wsUrl(url), this.options.connectTimeoutMs ?? 3000);
      if (this.stopped) {
        conn.close();
        return true;
      }
      this.listConn = conn;
      conn.onClose = () => {
        if (this.listConn === conn) this.listConn = undefined;
      };
      const list = conn.list!;
      const ageMs = list.generated_at_ms ? Math.max(0, Date.now() - list.generated_at_ms) : 0;
      const via = conn.hello.url ?? url;
      this.emit('farm', { list, ageMs, via });
      this.feed({ type: 'list_fetched', list, via, ageMs });
      return true;
    } catch (err) {
      return `${url}: ${(err as Error).message}`;
    }
  }

  private async getFarm(seed: string): Promise<FarmList> {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), this.options.listTimeoutMs ?? 2000);
    try {
      const res = await fetch(`${seed}/farm`, {
        headers: { Accept: 'application/json' },
        signal: ctrl.signal,
        cache: 'no-store',
      });
      if (!res.ok) throw new Error(`GET /farm: ${res.status}`);
      const list = (await res.json()) as FarmList;
      if (!Array.isArray(list.servers)) throw new Error('GET /farm: not a farm list');
      return list;
    } finally {
      clearTimeout(timer);
    }
  }

  private async connect(server: string, reuse: boolean, retry: boolean): Promise<void> {
    let conn: Connection | undefined;
    try {
      if (reuse && this.listConn) {
        conn = this.listConn;
        this.listConn = undefined;
      } else {
        const timeout = retry
          ? Math.min(this.options.retryTimeoutMs ?? 250, this.options.connectTimeoutMs ?? 3000)
          : (this.options.connectTimeoutMs ?? 3000);
        conn = await this.open(server, timeout, false);
      }
      if (this.stopped) return conn.close();
      await this.subscribeAll(conn, false, false);
    } catch (err) {
      conn?.close();
      this.feed(this.connectFailed(server, err));
      return;
    }
    this.adopt(conn, server);
  }

  private connectFailed(server: string, err: unknown): Input {
    const code = err instanceof OpenError ? err.code : undefined;
    return {
      type: 'connect_failed',
      server,
      error: (err as Error).message,
      elsewhere: code !== undefined && sendsElsewhere(code),
    };
  }

  /**
   * Opens a connection to `server` by the transport this session uses. A WebSocket that gets no
   * answer at all — refused, closed before it opened, or silent past `webSocketTimeoutMs` — is
   * retried at once as an event stream; when that works, the session stays with event streams
   * (tried again as a WebSocket after each failover, see {@link upgrade}). A close code is the
   * node's answer (draining, full) and is not retried.
   */
  private async open(server: string, timeoutMs: number, migrating: boolean): Promise<Connection> {
    const sse = this.transports.includes('sse');
    if (this.transportInUse === 'sse' && sse) return this.openSse(server, timeoutMs, migrating);
    if (!this.transports.includes('websocket')) return this.openSse(server, timeoutMs, migrating);
    const wsTimeout = sse ? Math.min(timeoutMs, this.options.webSocketTimeoutMs ?? 1500) : timeoutMs;
    let wsError: OpenError;
    try {
      return await WsConnection.open(await this.wsUrl(server), wsTimeout);
    } catch (err) {
      if (!sse || !(err instanceof OpenError) || err.code !== undefined) throw err;
      wsError = err;
    }
    let conn: Connection;
    try {
      conn = await this.openSse(server, timeoutMs, migrating);
    } catch (err) {
      throw new OpenError(`WebSocket: ${wsError.message}; event stream: ${(err as Error).message}`, (err as OpenError).code);
    }
    this.useTransport('sse', server, `WebSocket: ${wsError.message}`);
    return conn;
  }

  /** An event stream to `server`, subscribed to every topic from its held position. */
  private async openSse(server: string, timeoutMs: number, migrating: boolean): Promise<Connection> {
    const topics = [...this.subs.keys()];
    const request: SseRequest = { migrating };
    if (topics.length > 0) {
      request.lastEventId = encodeEventId(Object.fromEntries(topics.map((t) => [t, this.positions.get(t) ?? null])));
    }
    const token = await this.options.getToken?.();
    this.token = token;
    if (token) request.token = token;
    return SseConnection.open(server, timeoutMs, request);
  }

  /** Remembers the transport for the session and tells the application when it changed. */
  private useTransport(transport: Transport, server: string, reason: string): void {
    if (this.transportInUse === transport) return;
    this.transportInUse = transport;
    this.emit('transport', { server, transport, reason });
  }

  /**
   * Sends `hello` and `sub` for every topic (with held positions) and waits for `subscribed`.
   * With `hold`, the frames are not taken but held back, and returned (make-before-break).
   */
  private subscribeAll(conn: Connection, migrating: boolean, hold: boolean): Promise<Frame[]> {
    const topics = [...this.subs.keys()];
    const held: Frame[] = [];
    conn.onFrame = hold ? (frame) => held.push(frame) : (frame) => this.onFrame(conn, frame);
    conn.onSendError = (why) => this.emit('error', { code: 'send_failed', message: why });
    // What this client can do: the node moves it with `migrate` rather than closing it.
    if (conn.transport === 'websocket') {
      conn.send(migrating ? { type: 'hello', features: ['migrate'], migrating } : { type: 'hello', features: ['migrate'] });
    }
    if (topics.length === 0) return Promise.resolve(held);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        conn.onClose = () => {};
        reject(new Error(`not subscribed within ${this.options.subscribeTimeoutMs ?? 3000} ms`));
      }, this.options.subscribeTimeoutMs ?? 3000);
      conn.onClose = (cause) => {
        clearTimeout(timer);
        reject(new OpenError(describe(cause), cause.kind === 'closed' ? cause.code : undefined));
      };
      const subscribed = (frame: Frame) => {
        if (frame.type !== 'subscribed') return;
        clearTimeout(timer);
        resolve(held);
      };
      if (hold) {
        conn.onFrame = (frame) => {
          held.push(frame);
          subscribed(frame);
        };
      } else {
        conn.onFrame = (frame) => {
          this.onFrame(conn, frame);
          subscribed(frame);
        };
      }
      if (!conn.subscribedOnOpen) this.sendSub(conn, topics);
    });
  }

  private sendSub(conn: Connection, topics: string[]): void {
    const positions = this.positions.forSub(topics);
    conn.send(positions ? { type: 'sub', topics, positions } : { type: 'sub', topics });
  }

  /** The connection is the client's now: heartbeats, losses, watch. */
  private adopt(conn: Connection, server: string): void {
    const wasAway = this.awaySince;
    this.active = conn;
    conn.onFrame = (frame) => this.onFrame(conn, frame);
    conn.onClose = (cause) => this.lose(conn, server, cause);
    this.feed({ type: 'connected', server, list: conn.list });
    if (this.active !== conn) return;
    if (this.machine.current().type !== 'connected') {
      // The machine moved on meanwhile (stopped): this connection is no use.
      conn.close();
      this.active = undefined;
      return;
    }
    this.awaySince = undefined;
    this.started(conn, server);
    const unpositioned = [...this.subs.keys()].filter((t) => !this.positions.get(t));
    if (wasAway !== undefined && unpositioned.length > 0) {
      this.emit('maybeMissed', { topics: unpositioned, awayMs: Date.now() - wasAway });
    }
    // An event stream after a failover: the WebSocket may be allowed again.
    if (wasAway !== undefined && conn.transport === 'sse' && this.transports.includes('websocket')) {
      void this.upgrade(conn, server);
    }
  }

  /** What a connection the client takes starts with: late topics, the watch, heartbeats. */
  private started(conn: Connection, server: string): void {
    // Topics added while the connection was being made were not in its `sub`.
    const late = [...this.subs.values()].filter((sub) => sub.state !== 'subscribed').map((sub) => sub.topic);
    if (late.length > 0) this.sendSub(conn, late);
    if (this.options.watchList) {
      conn.send(this.options.watchUsers ? { type: 'list', watch: true, users: true } : { type: 'list', watch: true });
    }
    this.startHeartbeat(conn, server);
    this.scheduleRefresh(conn, this.token);
  }

  private lose(conn: Connection, server: string, cause: LossCause): void {
    if (this.active !== conn) return;
    if (this.arriving) {
      // The old connection of a move ended first: the new one takes over at once, and its
      // `subscribed` positions recover what the old one did not deliver.
      this.takeOver(false);
      return;
    }
    conn.close();
    this.active = undefined;
    this.stopHeartbeat();
    this.awaySince ??= Date.now();
    this.positions.lost();
    for (const topic of this.subs.keys()) this.setSubState(topic, 'subscribing');
    this.feed({ type: 'lost', server, cause });
  }

  /**
   * Make-before-break to `server` (a migration the node asked for, or the upgrade of an event
   * stream to a WebSocket): a second connection subscribes from the held positions while the
   * first keeps delivering; its frames are held back until the first has delivered every topic
   * up to where the second starts, then the first is closed and the second takes over.
   */
  private async moveTo(server: string, kind: 'migration' | 'upgrade', conn?: Connection): Promise<void> {
    let held: Frame[];
    try {
      conn ??= await this.open(server, this.options.connectTimeoutMs ?? 3000, kind === 'migration');
      if (this.stopped) return conn.close();
      held = await this.subscribeAll(conn, kind === 'migration', true);
    } catch (err) {
      conn?.close();
      if (kind === 'migration') this.feed(this.connectFailed(server, err));
      return;
    }
    const state = this.machine.current();
    if (kind === 'migration' && state.type === 'connecting' && state.server === server) {
      // The old connection ended before this one was up: it is the failover's now.
      conn.onFrame = (frame) => this.onFrame(conn, frame);
      for (const frame of held) this.onFrame(conn, frame);
      this.adopt(conn, server);
      return;
    }
    const moving =
      kind === 'migration'
        ? state.type === 'migrating' && state.to === server
        : state.type === 'connected' && state.server === server;
    if (!moving || !this.active || this.arriving) {
      conn.close();
      return;
    }
    const until: Record<string, Position> = {};
    for (const frame of held) {
      if (frame.type === 'subscribed') Object.assign(until, frame.positions as Record<string, Position> | undefined);
    }
    const newConn = conn;
    let bytes = 0;
    conn.onFrame = (frame) => {
      held.push(frame);
      bytes += JSON.stringify(frame).length;
      if (held.length >= MAX_HELD_FRAMES || bytes >= MAX_HELD_BYTES) this.takeOver(false);
    };
    conn.onClose = () => {
      if (this.arriving?.conn !== newConn) return;
      clearTimeout(this.arriving.timer);
      this.arriving = undefined;
      if (kind === 'migration') this.feed({ type: 'connect_failed', server, error: 'the new connection ended', elsewhere: false });
    };
    this.arriving = {
      conn,
      server,
      kind,
      held,
      until,
      timer: setTimeout(() => this.takeOver(false), CATCH_UP_MS),
    };
    this.checkArrival();
  }

  /** The new connection of a move takes over once the old one has caught up with it. */
  private checkArrival(): void {
    const a = this.arriving;
    if (!a) return;
    const state = catchUp(this.positions, this.subs, a.until);
    if (state !== 'waiting') this.takeOver(state === 'done');
  }

  private takeOver(caughtUp: boolean): void {
    const a = this.arriving;
    if (!a) return;
    this.arriving = undefined;
    clearTimeout(a.timer);
    this.active?.close();
    this.stopHeartbeat();
    const conn = a.conn;
    this.active = conn;
    conn.onClose = (cause) => this.lose(conn, a.server, cause);
    // Caught up: the new connection's `subscribed` has nothing to recover.
    for (const frame of a.held) if (!(caughtUp && frame.type === 'subscribed')) this.onFrame(conn, frame);
    conn.onFrame = (frame) => this.onFrame(conn, frame);
    if (a.kind === 'migration') this.feed({ type: 'migrated', server: a.server });
    else this.useTransport(conn.transport, a.server, 'WebSocket allowed again');
    if (this.active === conn) this.started(conn, a.server);
  }

  /** After a failover over an event stream: tries the WebSocket again, and moves to it
   * make-before-break when it works. */
  private async upgrade(stream: Connection, server: string): Promise<void> {
    let conn: Connection;
    try {
      conn = await WsConnection.open(await this.wsUrl(server), this.options.connectTimeoutMs ?? 3000);
    } catch {
      return; // Still refused: the event stream stays.
    }
    if (this.active !== stream || this.arriving || this.stopped) return conn.close();
    await this.moveTo(server, 'upgrade', conn);
  }

  private startHeartbeat(conn: Connection, server: string): void {
    this.stopHeartbeat();
    const interval = conn.hello.heartbeat_interval_ms ?? 1000;
    const timeout = this.options.heartbeatTimeoutMs ?? conn.hello.heartbeat_timeout_ms ?? 3000;
    const refresh = this.options.listRefreshMs ?? 5000;
    let listAt = Date.now();
    this.heartbeat = setInterval(
      () => {
        const now = Date.now();
        if (now - conn.lastReceived >= timeout) {
          this.lose(conn, server, { kind: 'heartbeat_timeout' });
          return;
        }
        // A stale list is refreshed (the watch pushes membership changes, not users); the
        // `farm` answer serves as the pong, so an idle connection then needs no ping.
        if (refresh > 0 && now - listAt >= refresh) {
          listAt = now;
          conn.send({ type: 'list' });
        } else if (conn.transport === 'websocket' && now - conn.lastSent >= interval) {
          // An event stream's node pings it, and waits for nothing from its client.
          conn.send({ type: 'ping' });
        }
      },
      Math.max(50, Math.min(interval, timeout) / 4),
    );
  }

  private stopHeartbeat(): void {
    if (this.heartbeat !== undefined) clearInterval(this.heartbeat);
    this.heartbeat = undefined;
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
  }

  /** Sends `conn` a fresh token (`refresh`) before `token` expires. */
  private scheduleRefresh(conn: Connection, token: string | undefined): void {
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    const exp = token ? tokenExpiry(token) : undefined;
    if (exp === undefined || !this.options.getToken) return;
    this.refreshTimer = setTimeout(async () => {
      this.refreshTimer = undefined;
      let fresh: string | undefined;
      try {
        fresh = await this.options.getToken?.();
      } catch {
        fresh = undefined;
      }
      if (this.active !== conn || this.stopped) return;
      if (fresh) {
        this.token = fresh;
        conn.send({ type: 'refresh', token: fresh });
        this.scheduleRefresh(conn, fresh);
      } else {
        // No token now: ask again in a second (the node closes 4012 once the old one expires).
        this.refreshTimer = setTimeout(() => this.scheduleRefresh(conn, token), 1000);
      }
    }, refreshDelayMs(exp, Date.now()));
  }

  private onFrame(conn: Connection, frame: Frame): void {
    switch (frame.type) {
      case 'ping':
        // An event stream's client sends no heartbeats (its node does not wait for them).
        if (conn.transport === 'websocket') conn.send(frame.id === undefined ? { type: 'pong' } : { type: 'pong', id: frame.id });
        break;
      case 'migrate': {
        const server = this.server();
        if (conn !== this.active || !server) break;
        const input: Input = { type: 'migrate_asked', server, reason: String(frame.reason ?? '') };
        if (typeof frame.to === 'string') input.to = frame.to;
        this.feed(input);
        break;
      }
      case 'farm': {
        const list = frame as unknown as FarmList;
        conn.list = list;
        const ageMs = list.generated_at_ms ? Math.max(0, Date.now() - list.generated_at_ms) : 0;
        if (conn === this.active) this.feed({ type: 'list_updated', list });
        this.emit('farm', { list, ageMs, via: conn.hello.url ?? conn.url });
        break;
      }
      case 'subscribed': {
        const topics = (frame.topics as string[]) ?? [];
        const done = this.positions.subscribed(topics, frame.positions as Record<string, Position> | undefined);
        for (const t of topics) if (this.subs.has(t)) this.setSubState(t, 'subscribed');
        for (const r of done) this.recovered(r);
        break;
      }
      case 'msg': {
        const topic = String(frame.topic);
        const sub = this.subs.get(topic);
        if (!sub) break;
        const { verdict, recovery, gap } = this.positions.message(topic, frame.epoch, frame.offset);
        if (gap) {
          sub._emit('gap', gap);
          this.emit('gap', gap);
        }
        if (verdict.deliver) {
          const m: Message = { topic, data: String(frame.data), recovered: verdict.recovered };
          if (frame.encoding === 'base64') m.encoding = 'base64';
          if (typeof frame.epoch === 'string') m.epoch = frame.epoch;
          if (typeof frame.offset === 'number') m.offset = frame.offset;
          sub._emit('message', m);
          this.emit('message', m);
        }
        if (recovery) this.recovered(recovery);
        if (conn === this.active) this.checkArrival();
        break;
      }
      case 'gap': {
        const gap: Gap = {
          topic: String(frame.topic),
          epoch: String(frame.epoch),
          from: Number(frame.from),
          reason: String(frame.reason ?? ''),
        };
        if (typeof frame.to === 'number') gap.to = frame.to;
        const recovery = this.positions.gap(gap);
        this.subs.get(gap.topic)?._emit('gap', gap);
        this.emit('gap', gap);
        if (recovery) this.recovered(recovery);
        if (conn === this.active) this.checkArrival();
        break;
      }
      case 'error':
        this.emit('error', { code: String(frame.code), message: String(frame.message ?? '') });
        break;
    }
  }

  private recovered(r: Recovery): void {
    this.subs.get(r.topic)?._emit('recovered', r);
    this.emit('recovered', r);
  }

  private setSubState(topic: string, state: SubscriptionState): void {
    const sub = this.subs.get(topic);
    if (!sub) return;
    // A new subscription starts as `subscribing`: announce that once, then only changes.
    if (sub.state === state && !(state === 'subscribing' && !this.announced.has(topic))) return;
    this.announced.add(topic);
    sub._emit('state', state);
    this.emit('subscription', { topic, state });
  }
}

export { CLOSE };
