/**
 * The client's token, read for its expiry only (the node checks its signature): when to send the
 * node a fresh one.
 */
/** The `exp` claim of a JWT (seconds since the epoch), read without checking its signature. */
export declare function tokenExpiry(token: string): number | undefined;
/** How long from `nowMs` to send a fresh token for one expiring at `exp`: 30 s before, or
 * half-way for a token with less than a minute left. */
export declare function refreshDelayMs(exp: number, nowMs: number): number;
