/**
 * A token bucket per key (a client address, say), in memory: `capacity` attempts at once, refilled at
 * `perMinute` attempts a minute. Used in front of the login form and the token endpoint, where
 * credential stuffing arrives at volume (docs/users.md). Per process: several servers behind a load
 * balancer each allow the rate (stated in the docs); the account lockout in users.ts is the
 * database-wide limit per account.
 *
 * @example
 * const limiter = new RateLimiter({ capacity: 10, perMinute: 10 });
 * const wait = limiter.take(ip); // 0: go ahead; otherwise seconds to wait (answer 429)
 */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  private readonly capacity: number;
  private readonly perMs: number;
  private readonly maxKeys: number;
  private readonly now: () => number;

  constructor(opts: { capacity: number; perMinute: number; maxKeys?: number; now?: () => number }) {
    this.capacity = opts.capacity;
    this.perMs = opts.perMinute / 60_000;
    this.maxKeys = opts.maxKeys ?? 100_000;
    this.now = opts.now ?? Date.now;
  }

  /** Whether `key` has run dry, without taking: 0 when a token is available, else seconds to wait. */
  wait(key: string): number {
    const b = this.buckets.get(key);
    if (!b) return 0;
    const tokens = Math.min(this.capacity, b.tokens + (this.now() - b.at) * this.perMs);
    return tokens >= 1 ? 0 : Math.max(1, Math.ceil((1 - tokens) / this.perMs / 1000));
  }

  /** Takes one token for `key`: 0 when allowed, else the whole seconds until one is available. */
  take(key: string): number {
    const now = this.now();
    let b = this.buckets.get(key);
    if (b) {
      b.tokens = Math.min(this.capacity, b.tokens + (now - b.at) * this.perMs);
      b.at = now;
    } else {
      // Bounded memory under a flood of distinct keys: forget the oldest (Map keeps insertion order).
      if (this.buckets.size >= this.maxKeys) this.buckets.delete(this.buckets.keys().next().value!);
      b = { tokens: this.capacity, at: now };
      this.buckets.set(key, b);
    }
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil((1 - b.tokens) / this.perMs / 1000));
  }
}
