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
export const MAX_EVENT_ID_BYTES = 64 * 1024;

const UNRESERVED = /^[A-Za-z0-9\-._~]$/;
const HEX = '0123456789ABCDEF';

function encodeTopic(topic: string): string {
  let out = '';
  for (const byte of new TextEncoder().encode(topic)) {
    const ch = String.fromCharCode(byte);
    out += UNRESERVED.test(ch) ? ch : `%${HEX[byte >> 4]}${HEX[byte & 15]}`;
  }
  return out;
}

/** Percent-decodes as the Rust `percent_decode_str` does: a `%` not followed by two hex digits
 * stays as it is; the bytes must be UTF-8. */
function decodeTopic(text: string): string | undefined {
  const bytes: number[] = [];
  const raw = new TextEncoder().encode(text);
  for (let i = 0; i < raw.length; i++) {
    const b = raw[i]!;
    const hex = b === 0x25 ? text.slice(i + 1, i + 3) : '';
    if (/^[0-9a-fA-F]{2}$/.test(hex) && raw[i + 1]! < 0x80 && raw[i + 2]! < 0x80) {
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(b);
    }
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(new Uint8Array(bytes));
  } catch {
    return undefined;
  }
}

/** Each topic's position (`null`: subscribed, no position known) → an event id. */
export function encodeEventId(positions: Record<string, Position | null>): string {
  // Sorted by UTF-8 bytes, as the Rust `BTreeMap<String, _>` orders its keys.
  const bytesOf = (s: string) => new TextEncoder().encode(s);
  const order = (a: string, b: string) => {
    const x = bytesOf(a);
    const y = bytesOf(b);
    for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i]! - y[i]!;
    return x.length - y.length;
  };
  return Object.keys(positions)
    .sort(order)
    .map((topic) => {
      const p = positions[topic];
      return p ? `${encodeTopic(topic)}:${p.epoch}:${p.offset}` : encodeTopic(topic);
    })
    .join(',');
}

/** An event id → each topic's position; throws an `Error` saying which entry is wrong, and how. */
export function parseEventId(id: string): Record<string, Position | null> {
  const length = new TextEncoder().encode(id).length;
  if (length > MAX_EVENT_ID_BYTES) {
    throw new Error(`event id of ${length} bytes is longer than ${MAX_EVENT_ID_BYTES}`);
  }
  const out: Record<string, Position | null> = {};
  id.split(',').forEach((entry, index) => {
    if (entry === '') return;
    const at = `event id entry ${index + 1} (${JSON.stringify(entry)})`;
    const parts = entry.split(':');
    const topic = decodeTopic(parts[0]!);
    if (topic === undefined) throw new Error(`${at}: the topic is not percent-encoded UTF-8`);
    if (topic === '') throw new Error(`${at}: no topic`);
    if (parts.length === 1) {
      out[topic] = null;
      return;
    }
    if (parts.length !== 3) throw new Error(`${at}: expected TOPIC or TOPIC:EPOCH:OFFSET`);
    const epoch = parts[1]!;
    if (epoch.length === 0 || epoch.length > 16) {
      throw new Error(`${at}: epoch ${JSON.stringify(epoch)} is not 1 to 16 hexadecimal digits`);
    }
    if (!/^[0-9a-fA-F]+$/.test(epoch)) throw new Error(`${at}: epoch ${JSON.stringify(epoch)} is not hexadecimal`);
    const offset = parts[2]!;
    if (!/^[0-9]+$/.test(offset)) throw new Error(`${at}: offset ${JSON.stringify(offset)} is not a whole number`);
    out[topic] = { epoch: epoch.toLowerCase().padStart(16, '0'), offset: Number(offset) };
  });
  return out;
}
