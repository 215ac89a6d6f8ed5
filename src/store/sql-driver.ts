/**
 * The storage port: the few SQL operations Custos needs, implemented once for embedded PGlite
 * (`./pglite/`) and once for a PostgreSQL server (`./pg/`). Everything above it (migrations,
 * the resource store, the audit store) is written once in PostgreSQL SQL and runs on both; the
 * shared suite in test/store.test.ts runs against both.
 */
export interface SqlQueryable {
  query<R = Record<string, unknown>>(
    sql: string,
    params?: readonly unknown[],
    opts?: QueryOptions,
  ): Promise<{ rows: R[] }>;
}

export interface QueryOptions {
  /**
   * A PostgreSQL server prepares the statement once per connection under this name and then only
   * binds and executes it (no parse and plan per call): for a fixed statement run very often, such as
   * the audit append. The same name must always go with the same SQL. Ignored where not supported.
   */
  name?: string;
  /**
   * A statement whose text repeats with different values (a search's page query): a driver that can
   * prepares it per connection under a name it assigns, for a bounded number of distinct texts, and
   * plans it for each call's values (never a generic plan). Ignored where not supported.
   */
  prepare?: boolean;
}

export interface SqlDriver extends SqlQueryable {
  readonly kind: 'embedded' | 'postgres';
  /** Runs `fn` in one transaction; rolls back if it throws. */
  transaction<T>(fn: (tx: SqlQueryable) => Promise<T>): Promise<T>;
  /**
   * Runs `fn` in a transaction that first takes an exclusive transaction-scoped advisory lock on
   * `key`, so that concurrent conditional writes on the same condition serialize (race-free
   * conditional create/update on a server with many connections).
   */
  lockedTransaction<T>(key: string, fn: (tx: SqlQueryable) => Promise<T>): Promise<T>;
  /**
   * PostgreSQL server only: streams `COPY (<query>) TO STDOUT (FORMAT binary)` on one connection, for
   * bulk reads where row-by-row results cost too much (`custos audit verify` reads the whole log).
   * `query` takes no parameters. Stopping early closes that connection.
   */
  copyOut?(query: string): AsyncIterable<Buffer>;
  close(): Promise<void>;
}

export type DatabaseErrorKind =
  | 'unique_violation'
  | 'serialization'
  | 'connection'
  /** SQLSTATE class 22: a value the query could not use (a bad cast, an overflow). */
  | 'data_exception'
  /** statement_timeout fired. */
  | 'canceled'
  | 'other';

/** Classifies a driver error by SQLSTATE. Never look at (or log) its message or `detail`: they hold data. */
export function classifyDatabaseError(e: unknown): DatabaseErrorKind {
  const code = (e as { code?: unknown } | null)?.code;
  if (code === '23505') return 'unique_violation';
  if (code === '40001' || code === '40P01') return 'serialization';
  if (code === '57014') return 'canceled';
  if (typeof code === 'string' && code.startsWith('22')) return 'data_exception';
  if (typeof code === 'string' && (code.startsWith('08') || code === '57P01' || code === 'ECONNREFUSED'))
    return 'connection';
  return 'other';
}
