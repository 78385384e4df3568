/**
 * Seeds and servers as addresses: the HTTP base of a seed (a URL, a streaming url or
 * `host[:port]`), the host of a url, and where a node serves its WebSocket by default.
 */

/** Where a node serves its WebSocket unless configured otherwise (`url` in its config). */
export const DEFAULT_STREAM_PATH = '/stream';

/** `http(s)://host:port` of a seed given as a URL, a streaming url or `host[:port]`. */
export function seedBase(seed: string): string {
  const s = seed.trim();
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(s) ? s : `http://${s}`;
  const url = new URL(withScheme);
  const scheme = url.protocol === 'wss:' || url.protocol === 'https:' ? 'https:' : 'http:';
  const port = url.port || (/^[a-z][a-z0-9+.-]*:\/\//i.test(s) ? '' : '7400');
  return `${scheme}//${url.hostname}${port ? `:${port}` : ''}`;
}

/** The `host[:port]` of a url; the text itself when it is not one. */
export function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return url;
  }
}
