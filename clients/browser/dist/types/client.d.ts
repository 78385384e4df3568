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
import { type FarmList, type Rng } from './model.js';
import { type Action, type Backoff, CLOSE, type Input, type LossCause, type RetryMode, type State } from './machine.js';
import { type Gap, type Position, Positions, type Recovery } from './positions.js';
import type { Policy } from './selection.js';
import { type Transport } from './connection.js';
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
    connected: {
        server: string;
        transport: Transport;
    };
    /** The connection to `server` ended. */
    disconnected: {
        server: string;
        cause: LossCause;
        reason: string;
    };
    /** Connected again after a loss (`to` may equal `from` when the retry worked). */
    failover: {
        from: string;
        to: string;
        tookMs: number;
        transport: Transport;
    };
    /** The session's transport changed: `sse` after a WebSocket got no answer, `websocket` when it
     * is allowed again (tried after each failover). */
    transport: {
        server: string;
        transport: Transport;
        reason: string;
    };
    /** Moved from `from` to `to` at `from`'s request, make-before-break (nothing lost, nothing twice). */
    migrated: {
        from: string;
        to: string;
        reason: string;
        tookMs: number;
        transport: Transport;
    };
    /** A migration's new connection failed: the client stays on `server`. */
    migrationFailed: {
        server: string;
        to: string;
        error: string;
    };
    /** A round found no server; the next starts after `delayMs`. */
    retrying: {
        reason: string;
        delayMs: number;
    };
    /** A farm list arrived (`hello`'s, a refresh, or a watched change). `ageMs`: since the node made it. */
    farm: {
        list: FarmList;
        ageMs: number;
        via: string;
    };
    /** A message on any subscribed topic. */
    message: Message;
    /** A topic's recovery after a resubscription is complete. */
    recovered: Recovery;
    /** Messages of a topic that could not be recovered. */
    gap: Gap;
    /** Resubscribed after a loss to a node that sends no positions: messages may be missing. */
    maybeMissed: {
        topics: string[];
        awayMs: number;
    };
    /** A subscription changed state. */
    subscription: {
        topic: string;
        state: SubscriptionState;
    };
    /** The node answered with an `error` frame. */
    error: {
        code: string;
        message: string;
    };
    /** The machine moved (for tests and diagnostics): what it was told and what it asked for. */
    transition: {
        input: Input['type'];
        state: State;
        actions: Action[];
    };
}
type Listener<T> = (event: T) => void;
/** A minimal typed event emitter. */
export declare class Emitter<E extends object> {
    private listeners;
    /** Calls `listener` on each `name` event; returns the function that stops it. */
    on<K extends keyof E>(name: K, listener: Listener<E[K]>): () => void;
    /** Stops calling `listener`. */
    off<K extends keyof E>(name: K, listener: Listener<E[K]>): void;
    protected emit<K extends keyof E>(name: K, event: E[K]): void;
}
/** The events of one {@link Subscription}. */
export interface SubscriptionEvents {
    message: Message;
    state: SubscriptionState;
    recovered: Recovery;
    gap: Gap;
}
/** One topic of a client: its state and its events. */
export declare class Subscription extends Emitter<SubscriptionEvents> {
    readonly topic: string;
    private readonly client;
    /** Where the subscription stands. */
    state: SubscriptionState;
    constructor(topic: string, client: Client);
    /** Stops the subscription. */
    unsubscribe(): void;
    /** The last position received, when the node sends positions. */
    position(): Position | undefined;
    /** @internal */
    _emit<K extends keyof SubscriptionEvents>(name: K, event: SubscriptionEvents[K]): void;
}
/**
 * Whether the client has everything up to `until`, a move's new connection's start: `done`,
 * `waiting`, or `never` (a topic moved to another epoch: the old connection will not get there).
 * As the Rust client's `catch_up`.
 */
export declare function catchUp(positions: Positions, subscribed: {
    has(topic: string): boolean;
}, until: Record<string, Position>): 'done' | 'waiting' | 'never';
/**
 * The streamfarm browser client. Create it with the service address (a seed list); it fetches
 * the farm list, picks its server with the policy, subscribes, keeps heartbeats, and fails over
 * by the transitions of the Rust client.
 */
export declare class Client extends Emitter<ClientEvents> {
    readonly options: ClientOptions;
    private readonly machine;
    private readonly positions;
    private readonly subs;
    private readonly seeds;
    private readonly rng;
    private active;
    /** The token the last connection was opened with. */
    private token;
    private refreshTimer;
    private listConn;
    private timers;
    private heartbeat;
    private awaySince;
    private stopped;
    private readonly announced;
    private readonly transports;
    /** The transport of this session: WebSocket until one gets no answer. */
    private transportInUse;
    /** A move's new connection, subscribed, while the old one catches up with it. */
    private arriving;
    private readonly onOnline;
    constructor(options: ClientOptions);
    /** Starts the client (once). */
    start(): void;
    /** Stops the client for good and closes its connections. */
    stop(): void;
    /** The machine's state. */
    state(): State;
    /** The url of the server connected to, if any. */
    server(): string | undefined;
    /** How the client streams now (`undefined` while not connected). */
    transport(): Transport | undefined;
    /** The most recent farm list. */
    farm(): FarmList | undefined;
    /** The last position received on `topic`, when the node sends positions. */
    position(topic: string): Position | undefined;
    /** Subscribes to `topic` (idempotent); the subscription follows the client across failovers. */
    subscribe(topic: string): Subscription;
    /** Stops receiving `topic`. */
    unsubscribe(topic: string): void;
    /** Publishes over the connection (when the node allows client publishing); false when not connected. */
    publish(topic: string, data: string): boolean;
    /** Ends a backoff wait now (the browser came back `online`). */
    wakeUp(): void;
    private feed;
    private perform;
    /** Drops a move's new connection that has not taken over (an upgrade that a migration or the
     * end of the client overtakes). */
    private cancelUpgrade;
    private wsUrl;
    private fetchList;
    /** `GET /farm` of `base` and reports the list; true when it did, else why not. */
    private listOverHttp;
    /**
     * Opens `url` for its `hello` + `farm` and reports the list, holding the connection for the
     * machine; true when it did, else why not.
     */
    private listOverWebSocket;
    private getFarm;
    private connect;
    private connectFailed;
    /**
     * Opens a connection to `server` by the transport this session uses. A WebSocket that gets no
     * answer at all — refused, closed before it opened, or silent past `webSocketTimeoutMs` — is
     * retried at once as an event stream; when that works, the session stays with event streams
     * (tried again as a WebSocket after each failover, see {@link upgrade}). A close code is the
     * node's answer (draining, full) and is not retried.
     */
    private open;
    /** An event stream to `server`, subscribed to every topic from its held position. */
    private openSse;
    /** Remembers the transport for the session and tells the application when it changed. */
    private useTransport;
    /**
     * Sends `hello` and `sub` for every topic (with held positions) and waits for `subscribed`.
     * With `hold`, the frames are not taken but held back, and returned (make-before-break).
     */
    private subscribeAll;
    private sendSub;
    /** The connection is the client's now: heartbeats, losses, watch. */
    private adopt;
    /** What a connection the client takes starts with: late topics, the watch, heartbeats. */
    private started;
    private lose;
    /**
     * Make-before-break to `server` (a migration the node asked for, or the upgrade of an event
     * stream to a WebSocket): a second connection subscribes from the held positions while the
     * first keeps delivering; its frames are held back until the first has delivered every topic
     * up to where the second starts, then the first is closed and the second takes over.
     */
    private moveTo;
    /** The new connection of a move takes over once the old one has caught up with it. */
    private checkArrival;
    private takeOver;
    /** After a failover over an event stream: tries the WebSocket again, and moves to it
     * make-before-break when it works. */
    private upgrade;
    private startHeartbeat;
    private stopHeartbeat;
    /** Sends `conn` a fresh token (`refresh`) before `token` expires. */
    private scheduleRefresh;
    private onFrame;
    private recovered;
    private setSubState;
}
export { CLOSE };
