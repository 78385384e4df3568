/**
 * Server selection, ported from `streamfarm_core::selection` (and tested on the same shared
 * vectors): which server of a farm list a client connects to.
 *
 * Every policy starts with {@link candidates}: the `UP` servers the client has not excluded, of
 * the most preferred priority group that has any. The policies differ in how they weigh those:
 * `weighted` (the default; `patent`, the seeds' name, is an alias), `random`, `least-users`, `p2c` and `waterfill`
 * (staleness-aware). Pure functions: no clock, the RNG is passed in (a list's `draw` stands in for
 * it, as in Rust).
 */
import { type FarmList, type Rng, type Status, groupComparator } from './model.js';

/**
 * A way of weighing the live servers of the preferred group, by name or by an alias
 * ({@link POLICY_ALIASES}). `weighted`: every live server, weighted by the share of the users
 * connected elsewhere (`Policy::Weighted` in Rust, where the name is argued).
 */
export type Policy = 'weighted' | 'random' | 'least-users' | 'p2c' | 'waterfill' | PolicyAlias;

/** Other names of a policy: `patent`, the seeds' name of `weighted`, which options and scripts use. */
export type PolicyAlias = 'patent';

/** The policy each alias names (`Policy::ALIASES` in Rust). */
export const POLICY_ALIASES: Readonly<Record<PolicyAlias, Policy>> = { patent: 'weighted' };

/** Every policy, in the order the Rust CLI lists them. */
export const POLICIES: readonly Policy[] = ['weighted', 'random', 'least-users', 'p2c', 'waterfill'];

/** How the first step judged one server. */
export type Verdict =
  | { kind: 'candidate' }
  | { kind: 'not_up'; status: Status }
  | { kind: 'excluded' }
  | { kind: 'less_preferred_group' };

/** Why no server could be chosen (code `no_server_available`, as in the vectors). */
export class NoServerAvailable extends Error {
  readonly code = 'no_server_available';
  constructor(
    readonly listed: number,
    readonly notUp: number,
    readonly excluded: number,
  ) {
    super(
      `no server available: ${listed} listed, ${notUp} not UP, ${excluded} excluded by the client`,
    );
    this.name = 'NoServerAvailable';
  }
}

/** The candidates (indices into `list.servers`, list order), the group kept, and every verdict. */
export interface Candidates {
  indices: number[];
  group: string;
  verdicts: Verdict[];
}

/** What a client knows about its list besides the list itself; only `waterfill` uses it. */
export interface Context {
  /** How old the list is, in seconds. */
  listAgeS: number;
  /** Farm-wide arrivals per second, when the client knows better than the list's `join_rate`s. */
  arrivalRate?: number;
}

const FRESH: Context = { listAgeS: 0 };

/** The first step of every policy; throws {@link NoServerAvailable}. */
export function candidates(list: FarmList, exclude: readonly string[] = []): Candidates {
  const verdicts: Verdict[] = list.servers.map((s) =>
    s.status !== 'UP'
      ? { kind: 'not_up', status: s.status }
      : exclude.includes(s.url)
        ? { kind: 'excluded' }
        : { kind: 'candidate' },
  );
  const compare = groupComparator(list.servers.map((s) => s.priority));
  let group: string | undefined;
  list.servers.forEach((s, i) => {
    if (verdicts[i]!.kind === 'candidate' && (group === undefined || compare(s.priority, group) < 0)) {
      group = s.priority;
    }
  });
  if (group === undefined) {
    const notUp = verdicts.filter((v) => v.kind === 'not_up').length;
    throw new NoServerAvailable(list.servers.length, notUp, list.servers.length - notUp);
  }
  const indices: number[] = [];
  list.servers.forEach((s, i) => {
    if (verdicts[i]!.kind !== 'candidate') return;
    if (compare(s.priority, group!) === 0) indices.push(i);
    else verdicts[i] = { kind: 'less_preferred_group' };
  });
  return { indices, group, verdicts };
}

/** The exact probability with which `policy` chooses each server (list order; 0 for non-candidates). */
export function probabilities(
  policy: Policy,
  list: FarmList,
  exclude: readonly string[] = [],
  context: Context = FRESH,
): number[] {
  return weigh(policy, list, candidates(list, exclude), context);
}

/**
 * The candidates' users brought to the instant of the freshest count among them (each older
 * count plus its join rate times the difference in age), each plus an even share of the other
 * clients in flight (`in_flight` less this list's own client, over the candidates), and that
 * count's age in seconds (`FarmList::users_at_one_instant` in Rust, sum for sum).
 */
export function usersAtOneInstant(list: FarmList, indices: number[]): { users: number[]; ageS: number } {
  const age = (i: number) => (list.servers[i]!.users_age_ms ?? 0) / 1000;
  const freshest = indices.length > 0 ? Math.min(...indices.map(age)) : 0;
  // The other clients in flight through this list's server: on their way, and no count shows them.
  const inFlight = list.in_flight;
  const inFlightShare =
    inFlight !== undefined && Number.isFinite(inFlight) && indices.length > 0
      ? Math.max(inFlight - 1, 0) / indices.length
      : 0;
  const users = indices.map(
    (i) => list.servers[i]!.users + sane(list.servers[i]!.join_rate) * (age(i) - freshest) + inFlightShare,
  );
  return { users, ageS: freshest };
}

function weigh(policy: Policy, list: FarmList, c: Candidates, context: Context): number[] {
  // Counts of different ages are compared as of one instant (the freshest among them).
  const { users, ageS } = usersAtOneInstant(list, c.indices);
  let weights: number[];
  const named = Object.prototype.hasOwnProperty.call(POLICY_ALIASES, policy) ? POLICY_ALIASES[policy as PolicyAlias] : policy;
  switch (named) {
    case 'weighted':
      weights = weightedWeights(users);
      break;
    case 'random':
      weights = users.map(() => 1 / users.length);
      break;
    case 'least-users':
      weights = leastUsersWeights(users);
      break;
    case 'p2c':
      weights = p2cWeights(users);
      break;
    case 'waterfill':
      // Arrivals since the counts were true are unseen too, not only since the list.
      weights = waterfillWeights(list, c.indices, users, { ...context, listAgeS: context.listAgeS + ageS });
      break;
    default:
      throw new Error(
        `unknown policy ${JSON.stringify(policy)}: expected one of weighted (or patent), random, least-users, p2c, waterfill`,
      );
  }
  const all = list.servers.map(() => 0);
  c.indices.forEach((i, k) => (all[i] = weights[k]!));
  return all;
}

/** `p_i = (1 - u_i / total) / (n - 1)`; 1 for a lone server; uniform when `total` is 0. */
function weightedWeights(users: number[]): number[] {
  const n = users.length;
  const total = users.reduce((a, b) => a + b, 0);
  if (n === 1) return [1];
  if (total === 0) return users.map(() => 1 / n);
  return users.map((u) => (1 - u / total) / (n - 1));
}

function leastUsersWeights(users: number[]): number[] {
  const fewest = Math.min(...users);
  const ties = users.filter((u) => u === fewest).length;
  return users.map((u) => (u === fewest ? 1 / ties : 0));
}

/** Each pair equally likely; a server wins a pair against one with more users, half against a tie. */
function p2cWeights(users: number[]): number[] {
  const n = users.length;
  if (n === 1) return [1];
  const pairs = (n * (n - 1)) / 2;
  return users.map((u, i) => {
    let wins = 0;
    users.forEach((v, j) => {
      if (j !== i) wins += u < v ? 1 : u === v ? 0.5 : 0;
    });
    return wins / pairs;
  });
}

/** See `crates/core/src/selection/waterfill.rs` for the derivation; this is a line-by-line port. */
const GUARD_SHARES = 2;

function sane(x: number | undefined): number {
  return x !== undefined && Number.isFinite(x) && x > 0 ? x : 0;
}

function waterfillWeights(list: FarmList, indices: number[], users: number[], context: Context): number[] {
  const servers = indices.map((i) => list.servers[i]!);
  const rate =
    context.arrivalRate ?? servers.reduce((sum, s) => sum + (s.join_rate === undefined ? 0 : sane(s.join_rate)), 0);
  const age = context.listAgeS;
  const water = Math.max(sane(rate) * age + 1, list.in_flight ?? 0);
  const byCapacity = servers.every((s) => s.capacity !== undefined && s.capacity > 0);
  const loads = servers.map((s, k) => ({
    users: users[k]!,
    weight: byCapacity ? s.capacity! : 1,
    projected: users[k]! + sane(s.join_rate) * age,
  }));
  const levelOf = (l: { users: number; weight: number }) => l.users / l.weight;
  const order = loads.map((_, i) => i).sort((a, b) => levelOf(loads[a]!) - levelOf(loads[b]!));
  let sumUsers = 0;
  let sumWeight = 0;
  let level = Infinity;
  for (let k = 0; k < order.length; k++) {
    const l = loads[order[k]!]!;
    sumUsers += l.users;
    sumWeight += l.weight;
    level = (water + sumUsers) / sumWeight;
    const next = order[k + 1];
    if (next !== undefined && levelOf(loads[next]!) < level) continue;
    break;
  }
  const open = loads.map((l) => Math.max(l.weight * level - l.users, 0));
  const margin = (GUARD_SHARES * water) / loads.reduce((a, l) => a + l.weight, 0);
  const guarded = loads.map((l, i) => Math.max(Math.min(open[i]!, l.weight * (level + margin) - l.projected), 0));
  const chosen = guarded.reduce((a, b) => a + b, 0) > 0 ? guarded : open;
  const total = chosen.reduce((a, b) => a + b, 0);
  return chosen.map((d) => d / total);
}

/** A server chosen by a policy, with the reasons. */
export interface Choice {
  /** Index of the chosen server in `list.servers`. */
  index: number;
  /** The probability of every server of the list under the policy. */
  probabilities: number[];
  /** How each server was judged before weighing. */
  candidates: Candidates;
}

/**
 * Chooses a server of `list` with `policy`; throws {@link NoServerAvailable}. The pick samples with
 * the list's `draw` when it is in `[0, 1)`, else with a draw from `rng` (`choose_with` in Rust).
 */
export function choose(
  policy: Policy,
  list: FarmList,
  exclude: readonly string[],
  rng: Rng,
  context: Context = FRESH,
): Choice {
  const c = candidates(list, exclude);
  const p = weigh(policy, list, c, context);
  // A list from JSON may carry anything: only a number in [0, 1) stands in for the client's draw.
  const listed = list.draw;
  const draw = typeof listed === 'number' && listed >= 0 && listed < 1 ? listed : rng();
  return { index: sample(p, c.indices, draw), probabilities: p, candidates: c };
}

/**
 * The index whose bucket holds `draw`, the buckets laid end to end in candidate order; rounding
 * that leaves the draw past the last bucket lands on the last positive one.
 */
function sample(p: number[], indices: number[], draw: number): number {
  let cumulative = 0;
  for (const i of indices) {
    cumulative += p[i]!;
    if (draw < cumulative) return i;
  }
  for (let k = indices.length - 1; k >= 0; k--) if (p[indices[k]!]! > 0) return indices[k]!;
  return indices[indices.length - 1]!;
}

/**
 * The context of a client whose server `lost` just went away: everyone that server had is
 * reconnecting too, over the reconnect window (`Context::reconnecting` in Rust).
 */
export function reconnectingContext(
  list: FarmList,
  lost: string,
  listAgeS: number,
  reconnectWindowS: number,
): Context {
  const listed = list.servers
    .filter((s) => s.status === 'UP' && s.url !== lost)
    .reduce((sum, s) => sum + sane(s.join_rate), 0);
  const orphans = list.servers.find((s) => s.url === lost)?.users ?? 0;
  const spread = Math.max(reconnectWindowS, listAgeS);
  const surge = spread > 0 ? orphans / spread : 0;
  return { listAgeS, arrivalRate: listed + surge };
}
