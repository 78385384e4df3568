/**
 * The browser client's streaming connection to a node, over either transport: a WebSocket, or
 * server-sent events with the client's frames sent up as `POST`s. It owns the handshake (`hello`
 * and `farm` within the connect timeout), holds the frames that arrive before the client takes
 * them (bounded in frames and bytes), and reports how it ended; what to do next is the client's.
 */
import type { LossCause } from './machine.js';
import type { FarmList } from './model.js';

/** The `hello` frame's fields the client uses. */
export interface Hello {
  server?: string;
  url?: string;
  heartbeat_interval_ms?: number;
  heartbeat_timeout_ms?: number;
}

export type Frame = { type: string; [field: string]: unknown };

/** Failure to open a streaming connection; `code` is the close code when the node closed it. */
export class OpenError extends Error {
  constructor(
    message: string,
    readonly code?: number,
  ) {
    super(message);
  }
}

/** How a connection streams: a WebSocket, or server-sent events with the client's frames sent up
 * as `POST`s (`docs/PROTOCOL.md`, Server-sent events). */
export type Transport = 'websocket' | 'sse';

/** Most frames, and bytes, a connection holds for the client before it takes them. */
export const MAX_HELD_FRAMES = 65_536;
export const MAX_HELD_BYTES = 16 * 1024 * 1024;

/** A streaming connection to a node, over either transport: `hello` + `farm` first, then frames. */
export abstract class Connection {
  abstract readonly transport: Transport;
  hello: Hello = {};
  list: FarmList | undefined;
  lastReceived = Date.now();
  lastSent = Date.now();
  /** The subscription travelled with the request (an event stream's `lastEventId`). */
  subscribedOnOpen = false;
  onClose: (cause: LossCause) => void = () => {};
  /** A frame could not be sent (an event stream's `POST` failed). */
  onSendError: (why: string) => void = () => {};
  protected closed = false;
  private handler: ((frame: Frame) => void) | undefined;
  /** Frames that arrived after the handshake, before a handler took them. */
  private early: Frame[] = [];

  constructor(readonly url: string) {}

  /** Takes every frame after the handshake: first those that arrived before it was set. */
  set onFrame(handler: (frame: Frame) => void) {
    this.handler = handler;
    const early = this.early.splice(0);
    for (const frame of early) handler(frame);
  }

  abstract send(frame: object): void;

  /** Closes without reporting a loss. */
  abstract close(): void;

  protected dispatch(frame: Frame): void {
    if (this.handler) this.handler(frame);
    else if (this.early.length < MAX_HELD_FRAMES) this.early.push(frame);
  }

  /**
   * Takes one frame of the handshake, or after it; resolves once `hello` and `farm` are in. The
   * timer rejects when they are not within the connect timeout.
   */
  protected handshake(timeoutMs: number, resolve: () => void, reject: (err: OpenError) => void) {
    let ready = false;
    const timer = setTimeout(() => finish(new OpenError(`no hello and farm within ${timeoutMs} ms`)), timeoutMs);
    const finish = (err?: OpenError) => {
      if (ready) return;
      ready = true;
      clearTimeout(timer);
      if (err) {
        this.close();
        reject(err);
      } else resolve();
    };
    return {
      frame: (frame: Frame) => {
        this.lastReceived = Date.now();
        if (ready) return this.dispatch(frame);
        if (frame.type === 'hello') this.hello = frame as Hello;
        else if (frame.type === 'farm') {
          this.list = frame as unknown as FarmList;
          finish();
        }
      },
      /** The connection ended: before the handshake, a failed open; true when it was after. */
      ended: (err: OpenError): boolean => {
        if (ready) return true;
        finish(err);
        return false;
      },
    };
  }
}

/** One WebSocket to a node. */
export class WsConnection extends Connection {
  readonly transport = 'websocket';

  private constructor(
    url: string,
    private readonly ws: WebSocket,
  ) {
    super(url);
  }

  /** Opens `url` and waits for `hello` and `farm`, at most `timeoutMs`. */
  static open(url: string, timeoutMs: number): Promise<WsConnection> {
    return new Promise((resolve, reject) => {
      let ws: WebSocket;
      try {
        ws = new WebSocket(url);
      } catch (err) {
        reject(new OpenError(String((err as Error).message ?? err)));
        return;
      }
      const conn = new WsConnection(url, ws);
      const handshake = conn.handshake(timeoutMs, () => resolve(conn), reject);
      ws.onmessage = (ev) => {
        let frame: Frame;
        try {
          frame = JSON.parse(String(ev.data));
        } catch {
          return;
        }
        handshake.frame(frame);
      };
      ws.onclose = (ev) => {
        const wasClosed = conn.closed;
        conn.closed = true;
        const failed = ev.code === 1006 ? 'connection failed' : `closed (${ev.code}: ${ev.reason})`;
        // A close code is the node's answer; 1006 is no answer at all (refused, blocked, broken).
        if (!handshake.ended(new OpenError(failed, ev.code === 1006 ? undefined : ev.code)) || wasClosed) return;
        conn.onClose(
          ev.code === 1006
            ? { kind: 'broken', detail: 'connection lost without a close frame' }
            : { kind: 'closed', code: ev.code, reason: ev.reason },
        );
      };
    });
  }

  send(frame: object): void {
    if (this.closed || this.ws.readyState !== 1) return;
    this.ws.send(JSON.stringify(frame));
    this.lastSent = Date.now();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.ws.close(1000);
    } catch {
      // Already closing.
    }
  }
}

/** The events of an event stream other than `msg` (unnamed) and `close`. */
const SSE_EVENTS = ['hello', 'farm', 'subscribed', 'unsubscribed', 'gap', 'feed', 'migrate', 'refreshed', 'error', 'ping', 'pong'];
/** Most bytes of frames waiting to be posted to an event stream's node. */
const MAX_POST_QUEUE_BYTES = 1024 * 1024;
/** How long one `POST` of a frame may take. */
const POST_TIMEOUT_MS = 5000;

/** What an event stream is opened with. */
export interface SseRequest {
  /** The subscription as an event id: every topic, from its position (`lastEventId`). */
  lastEventId?: string;
  token?: string;
  /** The new end of a migration. */
  migrating: boolean;
}

/** The event stream of a server: its streaming url with `ws`→`http` and the path `/sse`. */
export function sseUrl(server: string): URL {
  const url = new URL(server);
  url.protocol = url.protocol === 'wss:' || url.protocol === 'https:' ? 'https:' : 'http:';
  url.pathname = '/sse';
  url.search = '';
  return url;
}

/**
 * One event stream from a node (`GET /sse`, read by `EventSource`), with the client's frames sent
 * up as `POST /sse/{stream}` to the node that serves it, one at a time and in order.
 */
export class SseConnection extends Connection {
  readonly transport = 'sse';
  private posting: Promise<void> = Promise.resolve();
  private queuedBytes = 0;

  private constructor(
    url: string,
    private readonly es: EventSource,
  ) {
    super(url);
  }

  /** Opens the event stream of `server` and waits for `hello` and `farm`, at most `timeoutMs`. */
  static open(server: string, timeoutMs: number, request: SseRequest): Promise<SseConnection> {
    return new Promise((resolve, reject) => {
      const url = sseUrl(server);
      url.searchParams.set('features', 'migrate');
      if (request.migrating) url.searchParams.set('migrating', 'true');
      if (request.lastEventId) url.searchParams.set('lastEventId', request.lastEventId);
      if (request.token) url.searchParams.set('token', request.token);
      let es: EventSource;
      try {
        es = new EventSource(url.toString());
      } catch (err) {
        reject(new OpenError(String((err as Error).message ?? err)));
        return;
      }
      const conn = new SseConnection(server, es);
      conn.subscribedOnOpen = request.lastEventId !== undefined;
      const handshake = conn.handshake(timeoutMs, () => resolve(conn), reject);
      const take = (ev: Event) => {
        let frame: Frame;
        try {
          frame = JSON.parse(String((ev as MessageEvent).data));
        } catch {
          return;
        }
        handshake.frame(frame);
      };
      es.onmessage = take;
      for (const name of SSE_EVENTS) {
        es.addEventListener(name, (ev) => {
          // The node's `error` frame is a named event with data; the stream's own failure is a
          // plain `error` event without.
          if (name === 'error' && !(ev instanceof MessageEvent)) return;
          take(ev);
        });
      }
      es.addEventListener('close', (ev) => {
        let close: { code?: number; reason?: string } = {};
        try {
          close = JSON.parse(String((ev as MessageEvent).data));
        } catch {
          // A close event without its code: taken as a broken stream below.
        }
        conn.end(handshake, typeof close.code === 'number' ? { kind: 'closed', code: close.code, reason: close.reason ?? '' } : undefined);
      });
      es.onerror = (ev) => {
        // The node's `error` frames come to this handler too; only the stream's own failure ends it.
        if (!(ev instanceof MessageEvent)) conn.end(handshake, undefined);
      };
    });
  }

  /** The stream ended (`cause` absent: it failed, or the node went away). */
  private end(handshake: { ended: (err: OpenError) => boolean }, cause: LossCause | undefined): void {
    // Not EventSource's own reconnection: the client resumes where the machine says.
    this.es.close();
    const wasClosed = this.closed;
    this.closed = true;
    const err =
      cause?.kind === 'closed'
        ? new OpenError(`closed (${cause.code}: ${cause.reason})`, cause.code)
        : new OpenError('event stream failed');
    if (!handshake.ended(err) || wasClosed) return;
    this.onClose(cause ?? { kind: 'broken', detail: 'event stream ended' });
  }

  send(frame: object): void {
    const stream = (this.hello as { stream?: string }).stream;
    if (this.closed || !stream) return;
    const body = JSON.stringify(frame);
    if (this.queuedBytes + body.length > MAX_POST_QUEUE_BYTES) {
      this.onSendError(`${MAX_POST_QUEUE_BYTES} bytes of frames already wait to be posted; ${(frame as Frame).type} not sent`);
      return;
    }
    this.queuedBytes += body.length;
    this.lastSent = Date.now();
    const url = `${sseUrl(this.url).toString()}/${encodeURIComponent(stream)}`;
    this.posting = this.posting
      .then(() => this.post(url, body))
      .finally(() => {
        this.queuedBytes -= body.length;
      });
  }

  /** Posts one frame; a node with 16 frames waiting answers `429`, and the frame is posted again. */
  private async post(url: string, body: string): Promise<void> {
    for (let attempt = 0; attempt < 5 && !this.closed; attempt++) {
      let status: number;
      try {
        const res = await fetch(url, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body,
          signal: AbortSignal.timeout(POST_TIMEOUT_MS),
        });
        status = res.status;
      } catch (err) {
        this.onSendError(`POST ${url}: ${(err as Error).message}`);
        return;
      }
      if (status === 202) return;
      if (status !== 429) {
        this.onSendError(`POST ${url}: ${status}`);
        return;
      }
      await new Promise((r) => setTimeout(r, 50 * 2 ** attempt));
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.es.close();
  }
}
