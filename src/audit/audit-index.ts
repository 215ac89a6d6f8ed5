/**
 * The audit query index: table `audit_index`, one row per (entry, patient named) with the columns
 * an audit search filters on (time, action, outcome, purpose, project, client, user), so that "entries
 * about patient X between two dates" and the agent/action/outcome/purpose filters are index look-ups,
 * not a scan of the log. An event that names no patient has one row with patient `''`.
 *
 * The index is derived data with one definition, {@link indexRowsOf}: the sequencer writes its rows
 * in the transaction that appends the entries (audit-log.ts), the migration that creates it fills it
 * for entries already there ({@link backfillAuditIndex}), and `custos audit verify` recomputes it from
 * the entries in the same single pass that rehashes them (verify-batch.ts computes a digest of the
 * expected rows of each batch, {@link AuditIndexCheck} compares it with the stored rows of that batch's
 * sequence range and names the first entry whose rows differ). INSERT-only, like the entries.
 *
 * Queries never trust the index alone: audit-query.ts rechecks every event it returns against the
 * entry itself, so a forged index row cannot put a foreign event into a result; a removed or altered
 * row (which could hide one) is what verify reports.
 * @module
 */
import { hash } from 'node:crypto';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';

/** One row of `audit_index`. Strings absent from the event are null. */
export interface AuditIndexRow {
  seq: number;
  /** A patient id the event names, or `''` when it names none. */
  patient: string;
  /** The event time (ISO 8601, milliseconds, Z), or null when the event has none that parses. */
  time: string | null;
  action: string | null;
  outcome: string | null;
  purpose: string | null;
  projectId: string | null;
  clientId: string | null;
  userId: string | null;
}

/** Migration 5 of the audit database (audit-migrations.ts). */
export const AUDIT_INDEX_MIGRATION_SQL = `
-- The audit query index (src/audit/audit-index.ts, docs/audit.md): one row per entry and patient named
-- ('' when none), written by the sequencer in the transaction that appends the entries. Derived data:
-- custos audit verify recomputes every row from the entries. INSERT-only, like the entries.
CREATE TABLE audit_index (
  seq bigint NOT NULL CHECK (seq >= 0),
  patient text NOT NULL,
  event_time timestamptz,
  action text,
  outcome text,
  purpose text,
  project_id text,
  client_id text,
  user_id text,
  PRIMARY KEY (seq, patient)
);
CREATE INDEX audit_index_patient ON audit_index (patient, seq) WHERE patient <> '';
CREATE INDEX audit_index_time ON audit_index (event_time, seq);
CREATE INDEX audit_index_project ON audit_index (project_id, seq);
CREATE INDEX audit_index_client ON audit_index (client_id, seq);
CREATE INDEX audit_index_user ON audit_index (user_id, seq) WHERE user_id IS NOT NULL;
CREATE INDEX audit_index_purpose ON audit_index (purpose, seq);
CREATE INDEX audit_index_action ON audit_index (action, seq);
CREATE INDEX audit_index_outcome ON audit_index (outcome, seq) WHERE outcome <> 'success';
CREATE TRIGGER audit_index_no_update BEFORE UPDATE OR DELETE ON audit_index
  FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse_change();
CREATE TRIGGER audit_index_no_truncate BEFORE TRUNCATE ON audit_index
  FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse_change();
`;

/** The columns of `audit_index` in the order {@link indexColumns} returns their arrays. */
export const INDEX_COLUMNS =
  'seq, patient, event_time, action, outcome, purpose, project_id, client_id, user_id' as const;

function str(v: unknown): string | null {
  return typeof v === 'string' ? v : null;
}

/** ISO 8601 instant, normalized as `Date.prototype.toISOString` writes it; null if it does not parse. */
function instant(v: unknown): string | null {
  if (typeof v !== 'string') return null;
  const t = Date.parse(v);
  if (Number.isNaN(t)) return null;
  const iso = new Date(t).toISOString();
  // Years outside 0000-9999 are written with a sign, which PostgreSQL does not read.
  return /^\d{4}-/.test(iso) ? iso : null;
}

/**
 * The index rows of one decoded event, without their sequence number: one per distinct patient id
 * (sorted by UTF-16 code units), or one with patient `''`. Anything that is not an object has none.
 * The one definition of the index: the sequencer, the backfill and verify all use it.
 */
export function indexRowsOf(event: unknown): Omit<AuditIndexRow, 'seq'>[] {
  if (event === null || typeof event !== 'object' || Array.isArray(event)) return [];
  const e = event as Record<string, unknown>;
  const actor = e.actor !== null && typeof e.actor === 'object' ? (e.actor as Record<string, unknown>) : {};
  const common = {
    time: instant(e.time),
    action: str(e.action),
    outcome: str(e.outcome),
    purpose: str(e.purpose),
    projectId: str(e.projectId),
    clientId: str(actor.clientId),
    userId: str(actor.userId),
  };
  const patients = Array.isArray(e.patients)
    ? [...new Set(e.patients.filter((p): p is string => typeof p === 'string' && p !== ''))].sort(utf8Order)
    : [];
  return (patients.length > 0 ? patients : ['']).map((patient) => ({ patient, ...common }));
}

/** UTF-8 byte order (= code point order, = PostgreSQL's COLLATE "C"); UTF-16 order differs at surrogates. */
function utf8Order(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.codePointAt(i)!;
    const y = b.codePointAt(i)!;
    if (x !== y) return x - y;
    if (x > 0xffff) i++;
  }
  return a.length - b.length;
}

/** PostgreSQL type OIDs of the index columns, as `record_send` writes them. */
export const OID_INT8 = 20;
export const OID_TEXT = 25;
export const OID_TIMESTAMPTZ = 1184;

/** Milliseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z). */
const PG_EPOCH_MS = 946_684_800_000;

/**
 * The timestamptz `ms` (epoch milliseconds, an integer within FIRST_MS..LAST_MS) as PostgreSQL sends it:
 * int64 microseconds since 2000-01-01, big-endian, at `o`; returns the position after it. Exact without
 * BigInt: the microseconds pass 2^53, so they are put together from 20-bit and 12-bit halves.
 */
export function writeMicros(out: Uint8Array, o: number, ms: number): number {
  const d = ms - PG_EPOCH_MS;
  const dh = Math.floor(d / 1_048_576);
  const dl = d - dh * 1_048_576;
  const a = dh * 1000;
  let hi = Math.floor(a / 4096);
  let lo = (a - hi * 4096) * 1_048_576 + dl * 1000;
  if (lo >= 0x1_0000_0000) {
    lo -= 0x1_0000_0000;
    hi += 1;
  }
  for (const v of [hi, lo]) {
    out[o++] = v >>> 24;
    out[o++] = (v >>> 16) & 0xff;
    out[o++] = (v >>> 8) & 0xff;
    out[o++] = v & 0xff;
  }
  return o;
}

/**
 * One row as both sides of verify's comparison hash it: exactly what PostgreSQL's `record_send` writes
 * for the row (see storedDigestSql): the column count, then each column's type OID, length (-1 for
 * NULL) and binary value (int8, UTF-8 text, timestamptz as microseconds since 2000).
 */
export function rowRecord(seq: number, r: Omit<AuditIndexRow, 'seq'>): Buffer {
  const texts = [r.action, r.outcome, r.purpose, r.projectId, r.clientId, r.userId].map((v) =>
    v === null ? null : Buffer.from(v, 'utf8'),
  );
  const patient = Buffer.from(r.patient, 'utf8');
  const out = Buffer.alloc(
    4 + 16 + 8 + patient.length + 16 + 8 * 6 + texts.reduce((n, t) => n + (t?.length ?? 0), 0),
  );
  let o = out.writeInt32BE(9, 0);
  o = out.writeInt32BE(OID_INT8, o);
  o = out.writeInt32BE(8, o);
  o = out.writeBigInt64BE(BigInt(seq), o);
  o = out.writeInt32BE(OID_TEXT, o);
  o = out.writeInt32BE(patient.length, o);
  o += patient.copy(out, o);
  o = out.writeInt32BE(OID_TIMESTAMPTZ, o);
  const ms = r.time === null ? Number.NaN : Date.parse(r.time);
  if (Number.isNaN(ms)) o = out.writeInt32BE(-1, o);
  else o = writeMicros(out, out.writeInt32BE(8, o), ms);
  for (const t of texts) {
    o = out.writeInt32BE(OID_TEXT, o);
    o = out.writeInt32BE(t === null ? -1 : t.length, o);
    if (t) o += t.copy(out, o);
  }
  return out.subarray(0, o);
}

/**
 * The stored rows of a sequence range, digested by the database, so that verify transfers 64
 * characters per batch rather than its rows. Each row is hashed as `record_send` writes it, which is
 * {@link rowRecord}'s bytes (test/audit-query.test.ts checks that they agree), in (seq, patient) order:
 * the primary key's order where the database sorts text by code point (collation C, POSIX or C.UTF-8),
 * else an explicit `COLLATE "C"` sort. A difference from the expected digest is rechecked row by row
 * ({@link AuditIndexCheck.report}), so the digest's order is a matter of speed, not of correctness.
 */
export function storedDigestSql(codePointOrder: boolean): string {
  return `
SELECT count(*)::int AS n,
       encode(sha256(coalesce(string_agg(record_send(x), ''::bytea), ''::bytea)), 'hex') AS digest
  FROM (SELECT ${INDEX_COLUMNS} FROM audit_index WHERE seq >= $1 AND seq <= $2
         ORDER BY seq, patient${codePointOrder ? '' : ' COLLATE "C"'}) x`;
}

/** {@link storedDigestSql} for any database collation. */
export const STORED_DIGEST_SQL = storedDigestSql(false);

/** Epoch milliseconds of 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z: the instants {@link instant} keeps. */
export const FIRST_MS = -62_167_219_200_000;
export const LAST_MS = 253_402_300_799_999;

/**
 * The expected index rows of a stored entry (`b[start, end)`) as comparison bytes; empty for an entry
 * that does not decode (verify reports that entry itself). The same bytes as {@link indexRowsOf} then
 * {@link rowRecord}. verify-batch.ts derives them without decoding the entry for ordinary entries, and
 * calls this (or {@link indexRecordsOf} with the entry it already parsed) for the others.
 */
export function entryIndexRecords(seq: number, b: Buffer, start: number, end: number): Buffer {
  let e: unknown;
  try {
    e = JSON.parse(b.toString('utf8', start, end));
  } catch {
    return Buffer.alloc(0);
  }
  return indexRecordsOf(seq, e);
}

/** {@link entryIndexRecords} of an entry already decoded (`JSON.parse` of its bytes). */
export function indexRecordsOf(seq: number, parsed: unknown): Buffer {
  return Buffer.concat(indexRowsOf(parsed).map((r) => rowRecord(seq, r)));
}

/** COPY text escaping: backslash, tab, newline and carriage return; `\N` for null. */
function copyField(v: string | number | null): string {
  if (v === null) return '\\N';
  return String(v).replace(/[\\\t\n\r]/g, (c) =>
    c === '\\' ? '\\\\' : c === '\t' ? '\\t' : c === '\n' ? '\\n' : '\\r',
  );
}

/**
 * The index rows of event `e` at `seq` as lines of `COPY audit_index (INDEX_COLUMNS) FROM STDIN`
 * (text format), for bulk loads of a log (bench/audit-bench.ts seeds ten million entries this way).
 */
export function indexCopyLines(seq: number, e: unknown): string {
  let out = '';
  for (const r of indexRowsOf(e))
    out += `${[seq, r.patient, r.time, r.action, r.outcome, r.purpose, r.projectId, r.clientId, r.userId].map(copyField).join('\t')}\n`;
  return out;
}

/** SHA-256 (hex) of comparison bytes. */
export function indexDigest(bytes: Uint8Array | string): string {
  return hash('sha256', bytes, 'hex');
}

/** Column arrays of `rows` for an `unnest` insert, in {@link INDEX_COLUMNS} order (seq first). */
export function indexColumns(rows: readonly AuditIndexRow[]): unknown[][] {
  return [
    rows.map((r) => r.seq),
    rows.map((r) => r.patient),
    rows.map((r) => r.time),
    rows.map((r) => r.action),
    rows.map((r) => r.outcome),
    rows.map((r) => r.purpose),
    rows.map((r) => r.projectId),
    rows.map((r) => r.clientId),
    rows.map((r) => r.userId),
  ];
}

/** `unnest` of the nine column arrays starting at parameter `$first`, as `x(<INDEX_COLUMNS>)`. */
export function unnestIndexColumns(first: number): string {
  const p = (i: number) => `$${first + i}`;
  return `unnest(${p(0)}::bigint[], ${p(1)}::text[], ${p(2)}::timestamptz[], ${p(3)}::text[], ${p(4)}::text[], ${p(5)}::text[], ${p(6)}::text[], ${p(7)}::text[], ${p(8)}::text[]) AS x(${INDEX_COLUMNS})`;
}

/**
 * Indexes every entry that has no index row (all of them when the migration that creates the table
 * runs on an existing log), in pages, inside the caller's transaction. An entry that does not decode
 * gets no row; verify reports it. Returns the number of rows written.
 */
export async function backfillAuditIndex(q: SqlQueryable, page = 1000): Promise<number> {
  let last = -1;
  let written = 0;
  for (;;) {
    const r = await q.query<{ seq: number | string; entry: Uint8Array }>(
      `SELECT e.seq, e.entry FROM audit_entry e
        WHERE e.seq > $1 AND NOT EXISTS (SELECT 1 FROM audit_index i WHERE i.seq = e.seq)
        ORDER BY e.seq LIMIT $2`,
      [last, page],
    );
    if (r.rows.length === 0) return written;
    const rows: AuditIndexRow[] = [];
    for (const row of r.rows) {
      const seq = Number(row.seq);
      let event: unknown;
      try {
        event = JSON.parse(Buffer.from(row.entry).toString('utf8'));
      } catch {
        continue;
      }
      for (const x of indexRowsOf(event)) rows.push({ seq, ...x });
    }
    if (rows.length > 0) {
      await q.query(
        `INSERT INTO audit_index (${INDEX_COLUMNS}) SELECT * FROM ${unnestIndexColumns(1)}`,
        indexColumns(rows),
      );
      written += rows.length;
    }
    last = Number(r.rows[r.rows.length - 1]!.seq);
  }
}

/** What verify found in the index. */
export interface IndexReport {
  /** Index rows compared with the rows recomputed from the entries. */
  checkedRows: number;
  /** The first entry whose index rows differ from the recomputed ones (changed, missing, extra), or
   * the sequence number of an index row whose entry does not exist. */
  firstBadSeq: number | undefined;
}

/**
 * The index half of `custos audit verify`. For each batch of entries verify-batch.ts returns the
 * digest of the rows expected for them; the database digests the stored rows of the same sequence
 * range (asked when the batch is submitted, so it overlaps the hashing) and {@link expect} compares.
 * Ranges that differ are re-read row by row at the end to name the first entry whose rows differ. One
 * pass over the index.
 */
export class AuditIndexCheck {
  private checkedRows = 0;
  /** Ranges whose digests differed, in order (kept while none of them is known to hold a bad row). */
  private readonly differing: { lo: number; hi: number }[] = [];
  private nextLo = 0;
  private lastSeq = -1;

  private constructor(
    private readonly db: SqlDriver,
    private readonly digestSql: string,
  ) {}

  /** Undefined when the audit database has no index table (nothing to check). */
  static async open(db: SqlDriver): Promise<AuditIndexCheck | undefined> {
    const r = await db.query<{ t: string | null; collation: string | null }>(
      `SELECT to_regclass('audit_index')::text AS t,
              (SELECT datcollate FROM pg_database WHERE datname = current_database())::text AS collation`,
    );
    if (!r.rows[0]?.t) return undefined;
    // Collations that sort text by code point (= UTF-8 bytes): the primary key's order is the digest's.
    const codePoint = /^(C|POSIX|C\.UTF-?8)$/i.test(r.rows[0].collation ?? '');
    return new AuditIndexCheck(db, storedDigestSql(codePoint));
  }

  /**
   * Called when a batch whose last entry is `lastSeq` is submitted: starts reading the stored rows of
   * the range since the previous batch (index rows in a gap of the log are in some range too).
   */
  read(lastSeq: number): { lo: number; hi: number; stored: Promise<{ n: number; digest: string }> } {
    const lo = this.nextLo;
    const hi = Math.max(lastSeq, lo - 1);
    this.nextLo = hi + 1;
    this.lastSeq = hi;
    const stored =
      hi < lo
        ? Promise.resolve({ n: 0, digest: indexDigest('') })
        : this.db
            .query<{ n: number; digest: string }>(this.digestSql, [lo, hi])
            .then((r) => ({ n: Number(r.rows[0]!.n), digest: r.rows[0]!.digest }));
    stored.catch(() => {}); // awaited in expect(); not an unhandled rejection meanwhile
    return { lo, hi, stored };
  }

  /** Compares a batch's expected digest with the digest of its stored rows. */
  async expect(
    range: ReturnType<AuditIndexCheck['read']>,
    expectedDigest: string | undefined,
  ): Promise<void> {
    const stored = await range.stored;
    this.checkedRows += stored.n;
    if (expectedDigest === undefined) return;
    if (stored.digest !== expectedDigest) this.differing.push({ lo: range.lo, hi: range.hi });
  }

  /**
   * The first entry in `lo..hi` whose stored index rows differ from the expected ones (changed, missing,
   * extra), compared per entry with both sides in code point order; undefined when none does.
   */
  private async firstDifference(
    lo: number,
    hi: number,
    readEntries: (from: number, limit: number) => Promise<{ seq: number; entry: Buffer }[]>,
  ): Promise<number | undefined> {
    const expected = new Map<number, Buffer>();
    for (const e of await readEntries(lo, hi - lo + 1)) {
      if (e.seq > hi) break;
      expected.set(e.seq, entryIndexRecords(e.seq, e.entry, 0, e.entry.length));
    }
    const r = await this.db.query<{ seq: number | string; p: Uint8Array; r: Uint8Array }>(
      `SELECT x.seq, convert_to(x.patient, 'UTF8') AS p, record_send(x) AS r
         FROM (SELECT ${INDEX_COLUMNS} FROM audit_index WHERE seq >= $1 AND seq <= $2) x`,
      [lo, hi],
    );
    const rows = r.rows
      .map((x) => ({ seq: Number(x.seq), p: Buffer.from(x.p), r: Buffer.from(x.r) }))
      .sort((a, b) => a.seq - b.seq || Buffer.compare(a.p, b.p));
    const stored = new Map<number, Buffer[]>();
    for (const x of rows) {
      const list = stored.get(x.seq);
      if (list) list.push(x.r);
      else stored.set(x.seq, [x.r]);
    }
    const seqs = [...new Set([...expected.keys(), ...stored.keys()])].sort((a, b) => a - b);
    const none = Buffer.alloc(0);
    return seqs.find((s) => !(expected.get(s) ?? none).equals(Buffer.concat(stored.get(s) ?? [])));
  }

  /**
   * Finishes: if ranges differed, the first entry whose rows differ; else index rows past the last
   * entry read whose entry does not exist (left by a truncation).
   * `readEntries(from, n)` reads stored entries (AuditLog.read).
   */
  async report(
    readEntries: (from: number, limit: number) => Promise<{ seq: number; entry: Buffer }[]>,
  ): Promise<IndexReport> {
    for (const { lo, hi } of this.differing) {
      const firstBadSeq = await this.firstDifference(lo, hi, readEntries);
      if (firstBadSeq !== undefined) return { checkedRows: this.checkedRows, firstBadSeq };
    }
    // Rows of entries appended while verify ran have their entries (same transaction): not strays.
    const r = await this.db.query<{ seq: number | string | null }>(
      `SELECT min(i.seq) AS seq FROM audit_index i
        WHERE i.seq > $1 AND NOT EXISTS (SELECT 1 FROM audit_entry e WHERE e.seq = i.seq)`,
      [this.lastSeq],
    );
    const stray = r.rows[0]?.seq;
    return {
      checkedRows: this.checkedRows,
      firstBadSeq: stray !== null && stray !== undefined ? Number(stray) : undefined,
    };
  }
}
