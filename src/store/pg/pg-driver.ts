import pg from 'pg';
import { to as copyTo } from 'pg-copy-streams';
import type { SqlDriver, SqlQueryable } from '../sql-driver.ts';

// bigint (int8) columns come back as JS numbers: our sequence numbers and versions stay far below 2^53.
pg.types.setTypeParser(20, (v) => Number(v));

/** A PostgreSQL server through node-postgres' pool. */
export class PgDriver implements SqlDriver {
  readonly kind = 'postgres' as const;
  private constructor(private readonly pool: pg.Pool) {}

  static async open(url: string, opts: { max?: number } = {}): Promise<PgDriver> {
    const pool = new pg.Pool({ connectionString: url, max: opts.max ?? 10 });
    // An idle client's error (server restart) must not crash the process; callers see it on next use.
    pool.on('error', () => {});
    const c = await pool.connect();
    c.release();
    return new PgDriver(pool);
  }

  async query<R>(sql: string, params: readonly unknown[] = []): Promise<{ rows: R[] }> {
    const r = await this.pool.query(sql, params as unknown[]);
    return { rows: r.rows as R[] };
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
    await this.pool.end();
  }
}
