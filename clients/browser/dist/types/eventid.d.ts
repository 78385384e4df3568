/**
 * The positions of a server-sent event stream as an event `id` (`docs/PROTOCOL.md`, Server-sent
 * events), the port of `crates/core/src/protocol/event_id.rs`: the client writes its held
 * positions as an id to resume on a fresh stream (`lastEventId`), whichever transport it held
 * them from.
 *
 * An id is the topics, sorted, joined by `,`, each `TOPIC:EPOCH:OFFSET`, or `TOPIC` alone for a
 * topic without a position (it resumes live). `TOPIC` is percent-encoded (all but ASCII letters,
 * digits and `-._~`, as UTF-8 bytes), so an id is visible ASCII.
 */
import type { Position } from './positions.js';
/** Longest id accepted, in bytes (the node's limit). */
export declare const MAX_EVENT_ID_BYTES: number;
/** Each topic's position (`null`: subscribed, no position known) → an event id. */
export declare function encodeEventId(positions: Record<string, Position | null>): string;
/** An event id → each topic's position; throws an `Error` saying which entry is wrong, and how. */
export declare function parseEventId(id: string): Record<string, Position | null>;
