import pg from 'pg';
import { to as copyTo } from 'pg-copy-streams';
import type { QueryOptions, SqlDriver, SqlQueryable } from '../sql-driver.ts';

// bigint (int8) columns come back as JS numbers: our sequence numbers and versions stay far below 2^53.
pg.types.setTypeParser(20, (v) => Number(v));

/**
 * A driver that can run statements each bounded in time (`statement_timeout`) without a
 * transaction around them: searches use it (ResourceStore.searchQueries).
 */
export interface BoundedQueries {
  bounded(timeoutMs: number): SqlQueryable;
}

/**
 * How many distinct statement texts a process prepares under names it assigns
 * (`QueryOptions.prepare`); later texts run unprepared. It bounds what each connection of the bounded
 * pools keeps prepared on the server (the plan source of each statement, not a plan: see `bounded`).
 */
export const MAX_PREPARED_TEXTS = 128;

/** One statement on a pool: as the named prepared statement `name` when given, else unnamed. */
async function run<R>(
  pool: pg.Pool,
  sql: string,
  params: readonly unknown[],
  name: string | undefined,
): Promise<{ rows: R[] }> {
  const r = name
    ? await pool.query({ name, text: sql, values: params as unknown[] })
    : await pool.query(sql, params as unknown[]);
  return { rows: r.rows as R[] };
}

/** A PostgreSQL server through node-postgres' pool. */
export class PgDriver implements SqlDriver, BoundedQueries {
  readonly kind = 'postgres' as const;
  /** Pools whose connections carry a statement_timeout, by timeout (see `bounded`). */
  private readonly boundedPools = new Map<number, { pool: pg.Pool; q: SqlQueryable }>();
  /** The name assigned to each prepared text (`QueryOptions.prepare`), at most MAX_PREPARED_TEXTS. */
  private readonly preparedNames = new Map<string, string>();
  private constructor(
    private readonly pool: pg.Pool,
    private readonly url: string,
    private readonly max: number,
    /** PostgreSQL 12 or newer: `plan_cache_mode` exists, so `prepare` can be honoured. */
    private readonly customPlans: boolean,
  ) {}

  static async open(url: string, opts: { max?: number } = {}): Promise<PgDriver> {
    const max = opts.max ?? 10;
    const pool = new pg.Pool({ connectionString: url, max });
    // An idle client's error (server restart) must not crash the process; callers see it on next use.
    pool.on('error', () => {});
    const c = await pool.connect();
    let version: number;
    try {
      const r = await c.query<{ n: number }>(`SELECT current_setting('server_version_num')::int AS n`);
      version = r.rows[0]!.n;
    } finally {
      c.release();
    }
    return new PgDriver(pool, url, max, version >= 120000);
  }

  /** The name for a statement to prepare, or undefined (unprepared) once MAX_PREPARED_TEXTS are named. */
  private preparedName(sql: string): string | undefined {
    let name = this.preparedNames.get(sql);
    if (name === undefined && this.preparedNames.size < MAX_PREPARED_TEXTS) {
      name = `custos_p${this.preparedNames.size}`;
      this.preparedNames.set(sql, name);
    }
    return name;
  }

  /**
   * Statements each bounded by `timeoutMs` (PostgreSQL cancels one that runs longer: SQLSTATE
   * 57014), outside any transaction. The timeout is a startup parameter of the connections of a
   * second pool (opened on first use, idle connections closed after 10 s), so bounding costs no
   * round trip; `SET LOCAL statement_timeout` needed BEGIN, SET and COMMIT around every search.
   *
   * `QueryOptions.prepare` is honoured here: searches repeat a few statement texts with new values,
   * and parsing and analysing a search's text took 10–17% of its PostgreSQL CPU (docs/bench.md). These
   * connections set `plan_cache_mode = force_custom_plan`, so a prepared statement is still planned
   * for each call's values: a generic plan, chosen once for all values, could scan where the actual
   * value is selective (a common category against a rare one).
   */
  bounded(timeoutMs: number): SqlQueryable {
    const ms = Math.max(1, Math.floor(timeoutMs));
    let b = this.boundedPools.get(ms);
    if (!b) {
      const pool = new pg.Pool({
        connectionString: this.url,
        max: this.max,
        statement_timeout: ms,
        ...(this.customPlans ? { options: '-c plan_cache_mode=force_custom_plan' } : {}),
      });
      pool.on('error', () => {});
      b = {
        pool,
        q: {
          query: <R>(sql: string, params: readonly unknown[] = [], opts?: QueryOptions) =>
            run<R>(
              pool,
              sql,
              params,
              opts?.name ?? (opts?.prepare && this.customPlans ? this.preparedName(sql) : undefined),
            ),
        },
      };
      this.boundedPools.set(ms, b);
    }
    return b.q;
  }

  /** `opts.prepare` is not honoured on this pool: its connections may choose generic plans (see `bounded`). */
  query<R>(sql: string, params: readonly unknown[] = [], opts?: QueryOptions): Promise<{ rows: R[] }> {
    return run<R>(this.pool, sql, params, opts?.name);
  }

  async transaction<T>(fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    return this.run(undefined, fn);
  }

  lockedTransaction<T>(key: string, fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    return this.run(key, fn);
  }

  private async run<T>(lockKey: string | undefined, fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      if (lockKey !== undefined) {
        await client.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [lockKey]);
      }
      const result = await fn({
        query: async <R>(sql: string, params: readonly unknown[] = []) => ({
          rows: (await client.query(sql, params as unknown[])).rows as R[],
        }),
      });
      await client.query('COMMIT');
      return result;
    } catch (e) {
      await client.query('ROLLBACK').catch(() => {});
      throw e;
    } finally {
      client.release();
    }
  }

  async *copyOut(query: string): AsyncIterable<Buffer> {
    const client = await this.pool.connect();
    let done = false;
    try {
      for await (const chunk of client.query(copyTo(`COPY (${query}) TO STDOUT (FORMAT binary)`))) {
        yield chunk as Buffer;
      }
      done = true;
    } finally {
      // A COPY left half-read would leave the connection unusable: drop it instead.
      client.release(done ? undefined : true);
    }
  }

  async close(): Promise<void> {
    const pools = [...this.boundedPools.values()].map((b) => b.pool);
    this.boundedPools.clear();
    await Promise.all([this.pool.end(), ...pools.map((p) => p.end())]);
  }
}
