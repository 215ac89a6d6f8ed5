import type { SqlDriver } from '../store/sql-driver.ts';
import { encodeAuditEvent, leafHash, type AuditEvent } from './audit-event.ts';

interface Pending {
  entry: Buffer;
  hash: Buffer;
  requestId: string;
  phase: string;
  resolve: (seq: number) => void;
  reject: (e: unknown) => void;
}

/**
 * Appends audit events durably, in sequence order, with group commit: events arriving while a
 * batch is being committed wait for the next batch, which takes one transaction for all of them.
 * The sequence comes from the row-locked `audit_head`, so sequence numbers stay gapless and
 * correct when several Custos processes share one audit database.
 *
 * `append` resolves only after the COMMIT: callers rely on that for fail-closed audit.
 */
export class AuditLog {
  private queue: Pending[] = [];
  private flushing = false;
  private static readonly MAX_BATCH = 512;

  constructor(private readonly db: SqlDriver) {}

  append(event: AuditEvent): Promise<number> {
    const entry = encodeAuditEvent(event);
    return new Promise((resolve, reject) => {
      this.queue.push({
        entry,
        hash: leafHash(entry),
        requestId: event.requestId,
        phase: event.phase,
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
          const first = await this.db.transaction(async (tx) => {
            const head = await tx.query<{ next_seq: number }>(
              'UPDATE audit_head SET next_seq = next_seq + $1 WHERE id = 1 RETURNING next_seq',
              [batch.length],
            );
            const start = Number(head.rows[0]!.next_seq) - batch.length;
            await tx.query(
              `INSERT INTO audit_entry (seq, entry, leaf_hash, request_id, phase)
               SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[], $4::text[], $5::text[])`,
              [
                batch.map((_, i) => start + i),
                batch.map((p) => p.entry),
                batch.map((p) => p.hash),
                batch.map((p) => p.requestId),
                batch.map((p) => p.phase),
              ],
            );
            return start;
          });
          batch.forEach((p, i) => p.resolve(first + i));
        } catch (e) {
          for (const p of batch) p.reject(e);
        }
      }
    } finally {
      this.flushing = false;
    }
  }

  async size(): Promise<number> {
    const r = await this.db.query<{ next_seq: number }>('SELECT next_seq FROM audit_head WHERE id = 1');
    return Number(r.rows[0]?.next_seq ?? 0);
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
