import fs from 'node:fs';
import { PGlite } from '@electric-sql/pglite';
import type { SqlDriver, SqlQueryable } from '../sql-driver.ts';

/**
 * Embedded PostgreSQL (PGlite, in-process WASM). One process may open a data directory at a time;
 * the CLI therefore talks to a running server's admin API instead of opening it (INTERFACE.md).
 * PGlite has a single connection and runs transactions one after another, which is what makes
 * conditional writes race-free here without advisory locks.
 */
export class PgliteDriver implements SqlDriver {
  readonly kind = 'embedded' as const;
  private constructor(private readonly db: PGlite) {}

  /** `dir` undefined means in memory (tests). */
  static async open(dir: string | undefined): Promise<PgliteDriver> {
    if (dir) fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const db = dir ? new PGlite(dir) : new PGlite();
    await db.waitReady;
    return new PgliteDriver(db);
  }

  async query<R>(sql: string, params: readonly unknown[] = []): Promise<{ rows: R[] }> {
    const r = await this.db.query<R>(sql, params as unknown[]);
    return { rows: r.rows };
  }

  transaction<T>(fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    return this.db.transaction(async (tx) =>
      fn({
        query: async <R>(sql: string, params: readonly unknown[] = []) => ({
          rows: (await tx.query<R>(sql, params as unknown[])).rows,
        }),
      }),
    );
  }

  lockedTransaction<T>(_key: string, fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    return this.transaction(fn);
  }

  async close(): Promise<void> {
    await this.db.close();
  }
}
