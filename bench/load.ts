/**
 * A minimal closed-loop HTTP load generator for the benches: `concurrency` workers share one pool of
 * keep-alive connections (one each) and each sends its next request as soon as the previous answer has
 * been read completely. The client is undici's `Pool.request` (not fetch, not node:http): client and
 * server share the machine's cores, so the client's CPU per request is taken from the server's
 * throughput. Measured on this 2-core VM (2026-12-03, a 20 kB answer at concurrency 16): 55–121 µs of
 * client CPU per request against 130–208 µs with node:http's keep-alive Agent, which the benches used
 * before (docs/bench.md, search benchmark).
 */
import type { IncomingHttpHeaders } from 'node:http';
import { Pool, type Dispatcher } from 'undici';

export interface RequestSpec {
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
}

export interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

export interface LatencySummary {
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

export interface LoadResult {
  /** Requests sent (and answered). */
  requests: number;
  /** Answers with a 2xx status. */
  ok: number;
  /** Status code → count, for every answer (connection errors as "error"). */
  statuses: Record<string, number>;
  seconds: number;
  /** 2xx answers per second. */
  perSecond: number;
  latencyMs: LatencySummary;
  /** True when the phase stopped at its time cap before sending every request. */
  capped: boolean;
}

/** One keep-alive client for a base URL; `close()` ends its connections. */
export class HttpClient {
  private readonly pool: Pool;

  constructor(baseUrl: string, maxSockets: number) {
    // Idle connections are dropped after 4 s: Custos' server keeps idle connections for Node's default
    // 5 s (its serverFactory bypasses Fastify's keepAliveTimeout), and reusing a connection the server
    // is closing at that moment ends in ECONNRESET.
    this.pool = new Pool(new URL(baseUrl).origin, {
      connections: maxSockets,
      pipelining: 1,
      keepAliveTimeout: 4000,
      keepAliveMaxTimeout: 4000,
    });
  }

  async send(spec: RequestSpec): Promise<Reply> {
    const r = await this.pool.request({
      method: spec.method as Dispatcher.HttpMethod,
      path: spec.path,
      headers: spec.headers,
      body: spec.body,
    });
    const chunks: Buffer[] = [];
    for await (const c of r.body) chunks.push(c as Buffer);
    return { status: r.statusCode, headers: r.headers as IncomingHttpHeaders, body: Buffer.concat(chunks) };
  }

  close(): void {
    void this.pool.destroy();
  }
}

export function summarize(latenciesMs: Float64Array | number[]): LatencySummary {
  const a = Float64Array.from(latenciesMs).sort();
  if (a.length === 0) return { p50: 0, p90: 0, p99: 0, max: 0, mean: 0 };
  const at = (q: number) => a[Math.min(a.length - 1, Math.max(0, Math.ceil(q * a.length) - 1))]!;
  let sum = 0;
  for (const x of a) sum += x;
  const r = (x: number) => Math.round(x * 100) / 100;
  return {
    p50: r(at(0.5)),
    p90: r(at(0.9)),
    p99: r(at(0.99)),
    max: r(a[a.length - 1]!),
    mean: r(sum / a.length),
  };
}

/**
 * Sends requests `0 .. total-1` (built by `build(i)`) with `concurrency` in flight, stopping early
 * at `maxSeconds`. `onReply` sees every answer (e.g. to collect created ids).
 */
export async function runLoad(opts: {
  client: Pick<HttpClient, 'send'>;
  concurrency: number;
  total: number;
  maxSeconds: number;
  build: (i: number) => RequestSpec;
  onReply?: (i: number, reply: Reply) => void;
}): Promise<LoadResult> {
  const latencies = new Float64Array(opts.total);
  const statuses: Record<string, number> = {};
  let next = 0;
  let done = 0;
  let ok = 0;
  const start = performance.now();
  const deadline = start + opts.maxSeconds * 1000;
  const worker = async () => {
    for (;;) {
      if (next >= opts.total || performance.now() > deadline) return;
      const i = next++;
      const spec = opts.build(i);
      const t0 = performance.now();
      let status: string;
      try {
        const reply = await opts.client.send(spec);
        status = String(reply.status);
        if (reply.status >= 200 && reply.status < 300) ok++;
        opts.onReply?.(i, reply);
      } catch {
        status = 'error';
      }
      latencies[done++] = performance.now() - t0;
      statuses[status] = (statuses[status] ?? 0) + 1;
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency }, worker));
  const seconds = (performance.now() - start) / 1000;
  return {
    requests: done,
    ok,
    statuses,
    seconds: Math.round(seconds * 1000) / 1000,
    perSecond: Math.round((ok / seconds) * 10) / 10,
    latencyMs: summarize(latencies.subarray(0, done)),
    capped: done < opts.total,
  };
}

/** Deterministic PRNG (mulberry32): the same seed gives the same synthetic data and read order. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
