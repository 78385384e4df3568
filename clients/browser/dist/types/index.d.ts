/**
 * streamfarm for browsers: reach a farm through a seed list, pick a server by load, keep a
 * streaming connection, fail over by the same machine as the Rust client, and resume topics from
 * their positions. See `docs/CLIENT.md` (Browser).
 */
export { Client, Emitter, Subscription, catchUp } from './client.js';
export type { ClientEvents, ClientOptions, Message, SubscriptionEvents, SubscriptionState } from './client.js';
export { seedBase } from './address.js';
export { sseUrl } from './connection.js';
export type { Transport } from './connection.js';
export { refreshDelayMs, tokenExpiry } from './token.js';
export { CLOSE, DEFAULT_MACHINE_CONFIG, Machine, backoffCeiling, backoffDelay, describeLoss, sendsElsewhere, } from './machine.js';
export type { Action, Backoff, Input, ListSource, LossCause, MachineConfig, Notice, RetryMode, State } from './machine.js';
export { type FarmList, type Rng, type ServerEntry, type Status, groupComparator, groupOrder, seededRng, shuffle } from './model.js';
export { MAX_EVENT_ID_BYTES, encodeEventId, parseEventId } from './eventid.js';
export { Positions } from './positions.js';
export type { Gap, Position, Recovery, Verdict } from './positions.js';
export { NoServerAvailable, POLICIES, POLICY_ALIASES, candidates, choose, probabilities, reconnectingContext } from './selection.js';
export type { Candidates, Choice, Context, Policy, PolicyAlias } from './selection.js';
/** The library's version. */
export declare const VERSION = "0.1.0";
