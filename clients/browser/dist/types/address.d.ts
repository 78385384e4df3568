/**
 * Seeds and servers as addresses: the HTTP base of a seed (a URL, a streaming url or
 * `host[:port]`), the host of a url, and where a node serves its WebSocket by default.
 */
/** Where a node serves its WebSocket unless configured otherwise (`url` in its config). */
export declare const DEFAULT_STREAM_PATH = "/stream";
/** `http(s)://host:port` of a seed given as a URL, a streaming url or `host[:port]`. */
export declare function seedBase(seed: string): string;
/** The `host[:port]` of a url; the text itself when it is not one. */
export declare function hostOf(url: string): string;
