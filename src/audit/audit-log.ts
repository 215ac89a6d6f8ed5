import type { SqlDriver } from '../store/sql-driver.ts';
import { encodeAuditEvent, leafHash, type AuditEvent } from './audit-event.ts';
import { indexColumns, indexRowsOf, type AuditIndexRow } from './audit-index.ts';
import type { AuditSealer, SensitiveFields } from './audit-sealer.ts';

interface Pending {
  entry: Buffer;
  hash: Buffer;
  requestId: string;
  phase: string;
  /** Its rows of the query index (audit-index.ts), sequence number still to add. */
  index: Omit<AuditIndexRow, 'seq'>[];
  resolve: (seq: number) => void;
  reject: (e: unknown) => void;
}

/**
 * The advisory lock that orders appends across every process sharing one audit database. A
 * transaction-scoped advisory lock needs no table privilege (the application role has INSERT and
 * SELECT only: docs/adr/0006-audit-app-role.md) and is released by COMMIT, ROLLBACK or a lost
 * connection. Advisory locks are per database, so the key cannot collide with the resource database's.
 */
/**
 * One batch of appends: the sequence lock, the next number read after it was granted, the entries and
 * their query index rows, all in one statement (audit migration 9): one round trip where the
 * transaction of five statements (BEGIN, SET, lock, INSERT, COMMIT) took five.
 */
const APPEND_SQL = `SELECT audit_append($1::bytea, $2::int[], $3::int[], $4::bytea, $5::text[], $6::text[],
  $7::bigint[], $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
  $15::text[]) AS start`;

/** SQLSTATE audit_append raises when the transaction is not READ COMMITTED. */
const NEEDS_READ_COMMITTED = 'CA001';

/**
 * Appends audit events durably, in sequence order, with group commit: events arriving while a
 * batch is being committed wait for the next batch, which takes one transaction for all of them.
 *
 * Sequencing needs only INSERT and SELECT. Each batch's transaction takes the sequence lock, then
 * inserts its rows numbered from `max(seq) + 1` (one backward step of the primary key index). The
 * lock is held until COMMIT, and a transaction becomes visible before its locks are released, so
 * the next holder sees every earlier batch: sequence numbers stay gapless and in commit order
 * with several Custos processes on one database. A rolled-back batch consumes no numbers (unlike a
 * SEQUENCE). Should anything insert without the lock, the primary key refuses the duplicate and
 * the batch fails: never a fork in the log. PGlite has one connection and serializes anyway.
 *
 * Each entry's rows of the query index (audit-index.ts, table `audit_index`) are inserted by the same
 * statement, so an entry never commits without them. PHI-bearing fields passed to `append` are sealed
 * into the event (audit-sealer.ts) before it is encoded; nothing of them is stored in clear.
 *
 * `append` resolves only after the COMMIT: callers rely on that for fail-closed audit.
 */
export class AuditLog {
  private queue: Pending[] = [];
  private flushing = false;
  /** The database defaults to an isolation level audit_append refuses (see appendBatch). */
  private explicitIsolation = false;
  private static readonly MAX_BATCH = 512;

  /** Seals the PHI-bearing fields of events (audit-sealer.ts); without one they are dropped. */
  readonly sealer: AuditSealer | undefined;

  constructor(
    private readonly db: SqlDriver,
    opts: { sealer?: AuditSealer } = {},
  ) {
    this.sealer = opts.sealer;
  }

  /**
   * Appends `event`, with its rows of the query index, in the next batch. `sensitive` (a search's
   * query, a break-glass reason, a user agent) is stored only sealed, in the event's `sealed` field;
   * without a sealer it is not stored at all. Resolves with the sequence number once committed.
   */
  append(event: AuditEvent, sensitive?: SensitiveFields): Promise<number> {
    const sealed = sensitive && this.sealer ? this.sealer.seal(event.id, sensitive) : undefined;
    const e = sealed ? { ...event, sealed } : event;
    const entry = encodeAuditEvent(e);
    return new Promise((resolve, reject) => {
      this.queue.push({
        entry,
        hash: leafHash(entry),
        requestId: e.requestId,
        phase: e.phase,
        index: indexRowsOf(e),
        resolve,
        reject,
      });
      if (!this.flushing) void this.flush();
    });
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, AuditLog.MAX_BATCH);
        try {
          // x.seq of an index row is its entry's position in the batch until the head is known.
          const index = batch.flatMap((p, i) => p.index.map((row) => ({ ...row, seq: i })));
          const offsets: number[] = [];
          let at = 0;
          for (const p of batch) {
            offsets.push(at);
            at += p.entry.length;
          }
          const first = await this.appendBatch([
            Buffer.concat(batch.map((p) => p.entry)),
            offsets,
            batch.map((p) => p.entry.length),
            Buffer.concat(batch.map((p) => p.hash)),
            batch.map((p) => p.requestId),
            batch.map((p) => p.phase),
            ...indexColumns(index),
          ]);
          const resolveAll = () => batch.forEach((p, i) => p.resolve(first + i));
          // With another batch waiting, resolved in the next turn of the event loop, once that batch's
          // statement is on its way: the pool dispatches it from process.nextTick, which runs only
          // after every pending promise reaction, so resolving at once let the callers'
          // continuations (tens of ms for 512 requests) run first while PostgreSQL sat idle.
          if (this.queue.length > 0) setImmediate(resolveAll);
          else resolveAll();
        } catch (e) {
          for (const p of batch) p.reject(e);
        }
      }
    } finally {
      this.flushing = false;
    }
  }

  /**
   * Runs audit_append on its own (autocommit: one round trip). Where transactions default to another
   * isolation level than READ COMMITTED the function refuses, and from then on it runs inside a
   * transaction that asks for READ COMMITTED, as the append did before (four round trips).
   */
  private async appendBatch(params: unknown[]): Promise<number> {
    if (!this.explicitIsolation) {
      try {
        // Prepared once per connection: an append is then one Bind/Execute, no parse or plan.
        const r = await this.db.query<{ start: number }>(APPEND_SQL, params, { name: 'custos_audit_append' });
        return Number(r.rows[0]!.start);
      } catch (e) {
        if ((e as { code?: unknown } | null)?.code !== NEEDS_READ_COMMITTED) throw e;
        this.explicitIsolation = true;
      }
    }
    return this.db.transaction(async (tx) => {
      await tx.query('SET TRANSACTION ISOLATION LEVEL READ COMMITTED');
      const r = await tx.query<{ start: number }>(APPEND_SQL, params);
      return Number(r.rows[0]!.start);
    });
  }

  /**
   * The number of entries as the sequence sees it: the next sequence number. The head is derived
   * from the entries, so a log truncated by someone able to bypass the triggers looks whole here;
   * signed checkpoints (stored and exported) are what catch it (checkpoints.ts).
   */
  async size(): Promise<number> {
    const r = await this.db.query<{ size: number }>(
      'SELECT coalesce(max(seq) + 1, 0) AS size FROM audit_entry',
    );
    return Number(r.rows[0]?.size ?? 0);
  }

  /** Entries in sequence order from `fromSeq`, at most `limit`. */
  async read(fromSeq: number, limit: number): Promise<{ seq: number; entry: Buffer; leafHash: Buffer }[]> {
    const r = await this.db.query<{ seq: number; entry: Uint8Array; leaf_hash: Uint8Array }>(
      'SELECT seq, entry, leaf_hash FROM audit_entry WHERE seq >= $1 ORDER BY seq LIMIT $2',
      [fromSeq, limit],
    );
    return r.rows.map((row) => ({
      seq: Number(row.seq),
      entry: Buffer.from(row.entry),
      leafHash: Buffer.from(row.leaf_hash),
    }));
  }

  /** Leaf hashes of [from, to), in order: the log as a Merkle leaf source (merkle-proof.ts). */
  async leafHashes(from: number, to: number): Promise<Buffer[]> {
    const r = await this.db.query<{ leaf_hash: Uint8Array }>(
      'SELECT leaf_hash FROM audit_entry WHERE seq >= $1 AND seq < $2 ORDER BY seq',
      [from, to],
    );
    return r.rows.map((row) => Buffer.from(row.leaf_hash));
  }

  /** The SQL handle, for modules of the audit log that keep their own tables (checkpoints). */
  get database(): SqlDriver {
    return this.db;
  }

  async close(): Promise<void> {
    await this.db.close();
  }
}
