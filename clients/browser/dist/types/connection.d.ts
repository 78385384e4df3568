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
export type Frame = {
    type: string;
    [field: string]: unknown;
};
/** Failure to open a streaming connection; `code` is the close code when the node closed it. */
export declare class OpenError extends Error {
    readonly code?: number | undefined;
    constructor(message: string, code?: number | undefined);
}
/** How a connection streams: a WebSocket, or server-sent events with the client's frames sent up
 * as `POST`s (`docs/PROTOCOL.md`, Server-sent events). */
export type Transport = 'websocket' | 'sse';
/** Most frames, and bytes, a connection holds for the client before it takes them. */
export declare const MAX_HELD_FRAMES = 65536;
export declare const MAX_HELD_BYTES: number;
/** A streaming connection to a node, over either transport: `hello` + `farm` first, then frames. */
export declare abstract class Connection {
    readonly url: string;
    abstract readonly transport: Transport;
    hello: Hello;
    list: FarmList | undefined;
    lastReceived: number;
    lastSent: number;
    /** The subscription travelled with the request (an event stream's `lastEventId`). */
    subscribedOnOpen: boolean;
    onClose: (cause: LossCause) => void;
    /** A frame could not be sent (an event stream's `POST` failed). */
    onSendError: (why: string) => void;
    protected closed: boolean;
    private handler;
    /** Frames that arrived after the handshake, before a handler took them. */
    private early;
    constructor(url: string);
    /** Takes every frame after the handshake: first those that arrived before it was set. */
    set onFrame(handler: (frame: Frame) => void);
    abstract send(frame: object): void;
    /** Closes without reporting a loss. */
    abstract close(): void;
    protected dispatch(frame: Frame): void;
    /**
     * Takes one frame of the handshake, or after it; resolves once `hello` and `farm` are in. The
     * timer rejects when they are not within the connect timeout.
     */
    protected handshake(timeoutMs: number, resolve: () => void, reject: (err: OpenError) => void): {
        frame: (frame: Frame) => void;
        /** The connection ended: before the handshake, a failed open; true when it was after. */
        ended: (err: OpenError) => boolean;
    };
}
/** One WebSocket to a node. */
export declare class WsConnection extends Connection {
    private readonly ws;
    readonly transport = "websocket";
    private constructor();
    /** Opens `url` and waits for `hello` and `farm`, at most `timeoutMs`. */
    static open(url: string, timeoutMs: number): Promise<WsConnection>;
    send(frame: object): void;
    close(): void;
}
/** What an event stream is opened with. */
export interface SseRequest {
    /** The subscription as an event id: every topic, from its position (`lastEventId`). */
    lastEventId?: string;
    token?: string;
    /** The new end of a migration. */
    migrating: boolean;
}
/** The event stream of a server: its streaming url with `ws`→`http` and the path `/sse`. */
export declare function sseUrl(server: string): URL;
/**
 * One event stream from a node (`GET /sse`, read by `EventSource`), with the client's frames sent
 * up as `POST /sse/{stream}` to the node that serves it, one at a time and in order.
 */
export declare class SseConnection extends Connection {
    private readonly es;
    readonly transport = "sse";
    private posting;
    private queuedBytes;
    private constructor();
    /** Opens the event stream of `server` and waits for `hello` and `farm`, at most `timeoutMs`. */
    static open(server: string, timeoutMs: number, request: SseRequest): Promise<SseConnection>;
    /** The stream ended (`cause` absent: it failed, or the node went away). */
    private end;
    send(frame: object): void;
    /** Posts one frame; a node with 16 frames waiting answers `429`, and the frame is posted again. */
    private post;
    close(): void;
}
