/**
 * The client's token, read for its expiry only (the node checks its signature): when to send the
 * node a fresh one.
 */

/** The `exp` claim of a JWT (seconds since the epoch), read without checking its signature. */
export function tokenExpiry(token: string): number | undefined {
  const payload = token.split('.')[1];
  if (!payload) return undefined;
  try {
    const base64 = payload.replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(base64 + '='.repeat((4 - (base64.length % 4)) % 4)));
    return typeof claims.exp === 'number' ? claims.exp : undefined;
  } catch {
    return undefined;
  }
}

/** How long from `nowMs` to send a fresh token for one expiring at `exp`: 30 s before, or
 * half-way for a token with less than a minute left. */
export function refreshDelayMs(exp: number, nowMs: number): number {
  const left = Math.max(0, exp * 1000 - nowMs);
  return Math.max(left - 30_000, left / 2);
}
