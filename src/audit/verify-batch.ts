/**
 * The per-entry work of `custos audit verify`, on batches of stored rows: recompute each leaf hash from
 * the entry bytes, compare it with the stored one, decode the entry (write attempts and outcomes), and
 * hash each group of 256 leaves into its level-0 tile root. Runs on the main thread (small logs,
 * embedded storage) or in worker threads (verify-worker.ts): the same function either way, so the two
 * paths cannot differ.
 *
 * Rows travel in PostgreSQL's COPY BINARY tuple format, three fields each: seq int8, entry bytea,
 * leaf_hash bytea. A server streams exactly that (`COPY … TO STDOUT (FORMAT binary)`); rows read with
 * SELECT are packed the same way ({@link packRows}).
 * @module
 */
import { isUtf8 } from 'node:buffer';
import { hash } from 'node:crypto';
import {
  entryIndexRecords,
  FIRST_MS,
  indexRecordsOf,
  LAST_MS,
  OID_INT8,
  OID_TEXT,
  OID_TIMESTAMPTZ,
  writeMicros,
} from './audit-index.ts';

const HASH = 32;
const GROUP = 256;

export type RowProblem = 'leaf_hash_mismatch' | 'undecodable_entry';

export interface BatchResult {
  count: number;
  /** The recomputed leaf hashes, 32 bytes each, in row order. */
  leafHashes: Buffer;
  /** MTH of each whole group of 256 rows (a batch starts at a multiple of 256 rows). */
  roots: Buffer;
  /** The first row whose stored leaf hash differs from the recomputed one, or that does not decode. */
  bad: { index: number; seq: number; problem: RowProblem } | undefined;
  /** Write attempts (1) and outcomes (2) in row order, with their request ids. */
  eventKinds: number[];
  eventIds: unknown[];
  /** With `index`: SHA-256 (hex) of the query index rows these entries imply (audit-index.ts). */
  indexDigest?: string;
}

/**
 * Processes `count` tuples packed in `buf` (no COPY header or trailer). `buf` is left as it was.
 * `index`: also derive each entry's query index rows and return their digest. Each entry is read
 * once: the scan that finds its write phase also finds its index fields (see {@link scanEntry}), and
 * the rows' bytes are assembled from the entry's bytes; only an entry the scan is not sure of is
 * parsed, once, for both.
 */
export function processBatch(buf: Buffer, count: number, index = false): BatchResult {
  const leafHashes = Buffer.from(new ArrayBuffer(count * HASH));
  const groups = Math.floor(count / GROUP);
  const roots = Buffer.from(new ArrayBuffer(groups * HASH));
  let bad: BatchResult['bad'];
  const eventKinds: number[] = [];
  const eventIds: unknown[] = [];
  const row: string[] = new Array<string>(GROUP);
  // The batch's index rows in PostgreSQL's binary record format, hashed once at the end.
  const text = index ? new RecordOut(count * 256) : undefined;
  let o = 0;
  for (let i = 0; i < count; i++) {
    o += 2; // field count, checked by the splitter
    const seqLen = buf.readInt32BE(o);
    o += 4;
    const seq = seqLen === 8 ? buf.readInt32BE(o) * 0x1_0000_0000 + buf.readUInt32BE(o + 4) : Number.NaN;
    o += Math.max(seqLen, 0);
    const entryLen = buf.readInt32BE(o);
    o += 4;
    const entryStart = o;
    const entryEnd = o + Math.max(entryLen, 0);
    o = entryEnd;
    const leafLen = buf.readInt32BE(o);
    o += 4;
    const leafStart = o;
    o += Math.max(leafLen, 0);
    // SHA-256(0x00 || entry), hashed in place: the byte before the entry (the end of its length field)
    // is set to 0x00 for the call and put back. A one-byte string result costs less than a Buffer.
    const saved = buf[entryStart - 1]!;
    buf[entryStart - 1] = 0;
    const leaf = hash('sha256', buf.subarray(entryStart - 1, entryEnd), 'binary');
    buf[entryStart - 1] = saved;
    leafHashes.write(leaf, i * HASH, HASH, 'latin1');
    if (i < groups * GROUP) row[i % GROUP] = leaf;
    if (i % GROUP === GROUP - 1 && i < groups * GROUP)
      roots.write(groupRoot(row), (i >> 8) * HASH, HASH, 'latin1');
    const mismatch =
      leafLen !== HASH ||
      leafHashes.compare(buf, leafStart, leafStart + HASH, i * HASH, (i + 1) * HASH) !== 0;
    let undecodable = false;
    if (scanEntry(buf, entryStart, entryEnd, index)) {
      // Valid JSON, an object: the event fields were read by the scan (see scanEntry).
      if (scanned.phase !== 0 && scanned.idEnd > scanned.idStart) {
        eventKinds.push(scanned.phase);
        eventIds.push(buf.toString('utf8', scanned.idStart, scanned.idEnd));
      }
      if (text && !(scanned.index && text.rows(seq, buf)))
        text.bytes(entryIndexRecords(seq, buf, entryStart, entryEnd));
    } else {
      let e: EventFields | null = null;
      try {
        e = JSON.parse(buf.toString('utf8', entryStart, entryEnd)) as EventFields | null;
      } catch {
        undecodable = true;
      }
      // `null` is undecodable too: it has no fields to read.
      if (e === null) undecodable = true;
      else {
        if (e.phase === 'attempt' && e.requestId) {
          eventKinds.push(1);
          eventIds.push(e.requestId);
        }
        if (e.phase === 'outcome' && e.requestId) {
          eventKinds.push(2);
          eventIds.push(e.requestId);
        }
        // The rows of the entry just parsed (none for one that is not an object).
        if (text) text.bytes(indexRecordsOf(seq, e));
      }
    }
    if (bad === undefined && (mismatch || undecodable)) {
      bad = { index: i, seq, problem: mismatch ? 'leaf_hash_mismatch' : 'undecodable_entry' };
    }
  }
  const result: BatchResult = { count, leafHashes, roots, bad, ...compressEvents(eventKinds, eventIds) };
  if (text) result.indexDigest = hash('sha256', text.written(), 'hex');
  return result;
}

/** What verify reads from a decoded entry. */
interface EventFields {
  phase?: unknown;
  requestId?: unknown;
}

/**
 * The index rows of a batch as the bytes audit-index.ts's `rowRecord` writes (and PostgreSQL's
 * `record_send` for the stored rows), assembled from the entries' bytes for the entries
 * {@link scanEntry} read whole, given whole for the others.
 */
class RecordOut {
  private buf: Buffer;
  private o = 0;

  constructor(size: number) {
    this.buf = Buffer.allocUnsafe(Math.max(size, 4096));
  }

  private room(n: number): void {
    if (this.o + n <= this.buf.length) return;
    const bigger = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.o + n));
    this.buf.copy(bigger, 0, 0, this.o);
    this.buf = bigger;
  }

  written(): Buffer {
    return this.buf.subarray(0, this.o);
  }

  bytes(b: Buffer): void {
    if (b.length === 0) return;
    this.room(b.length);
    this.o += b.copy(this.buf, this.o);
  }

  /**
   * The rows of the entry {@link scanEntry} just read, from its bytes: a JSON string without escapes is
   * its bytes, provided they are UTF-8 (else decoding would have replaced some). False, with nothing
   * written, when a value is not UTF-8: the caller then decodes the entry.
   */
  rows(seq: number, b: Buffer): boolean {
    const f = scanned.fields;
    const p = scanned.patients;
    const np = scanned.patientCount;
    let ms = Number.NaN;
    if (f[0]! >= 0) {
      const t = timeValue(b, f[0]!, f[1]!);
      if (t >= FIRST_MS && t <= LAST_MS) ms = t;
    }
    const order = np > 1 ? sortedPatients(b) : undefined;
    const rows = order ? order.length : 1;
    let size = 128;
    for (let k = 2; k < 14; k += 2) if (f[k]! >= 0) size += f[k + 1]! - f[k]!;
    for (let k = 0; k < np; k++) size += p[2 * k + 1]! - p[2 * k]! + 48;
    this.room(size * rows);
    const out = this.buf;
    let o = this.o;
    let high = 0;
    let tailStart = 0;
    let tailEnd = 0;
    for (let r = 0; r < rows; r++) {
      o = put32(out, o, 9);
      o = put32(out, o, OID_INT8);
      o = put32(out, o, 8);
      o = put32(out, o, Math.floor(seq / 0x1_0000_0000));
      o = put32(out, o, seq >>> 0);
      o = put32(out, o, OID_TEXT);
      const lenAt = o;
      o += 4;
      if (np > 0) {
        const at = order ? order[r]! : 0;
        for (let k = p[2 * at]!, e = p[2 * at + 1]!; k < e; k++) high |= out[o++] = b[k]!;
      }
      put32(out, lenAt, o - lenAt - 4);
      if (r > 0) {
        // The same fields as the first row.
        out.copyWithin(o, tailStart, tailEnd);
        o += tailEnd - tailStart;
        continue;
      }
      tailStart = o;
      o = put32(out, o, OID_TIMESTAMPTZ);
      if (Number.isNaN(ms)) o = put32(out, o, -1);
      else o = writeMicros(out, put32(out, o, 8), ms);
      for (let k = 2; k < 14; k += 2) {
        o = put32(out, o, OID_TEXT);
        const s = f[k]!;
        if (s < 0) {
          o = put32(out, o, -1);
          continue;
        }
        const e = f[k + 1]!;
        o = put32(out, o, e - s);
        for (let q = s; q < e; q++) high |= out[o++] = b[q]!;
      }
      tailEnd = o;
    }
    if (high >= 0x80 && !capturedUtf8(b)) return false;
    this.o = o;
    return true;
  }
}

/** A 32-bit integer, big-endian, at `o` (its low 32 bits); returns the position after it. */
function put32(out: Uint8Array, o: number, v: number): number {
  out[o] = v >>> 24;
  out[o + 1] = (v >>> 16) & 0xff;
  out[o + 2] = (v >>> 8) & 0xff;
  out[o + 3] = v & 0xff;
  return o + 4;
}

/** Whether every string value the last scan captured is UTF-8. */
function capturedUtf8(b: Buffer): boolean {
  const f = scanned.fields;
  const p = scanned.patients;
  for (let k = 2; k < 14; k += 2) if (f[k]! >= 0 && !isUtf8(b.subarray(f[k]!, f[k + 1]!))) return false;
  for (let k = 0; k < scanned.patientCount; k++)
    if (!isUtf8(b.subarray(p[2 * k]!, p[2 * k + 1]!))) return false;
  return true;
}

/** The last minute `timeValue` parsed ("YYYY-MM-DDTHH:MM", 16 bytes) and its epoch milliseconds. */
const minute = { bytes: Buffer.alloc(16), ms: Number.NaN };

function sameMinute(b: Buffer, s: number): boolean {
  const m = minute.bytes;
  for (let k = 15; k >= 0; k--) if (b[s + k] !== m[k]) return false;
  return true;
}

const digit = (c: number | undefined) => c !== undefined && c >= 0x30 && c <= 0x39;

/**
 * `Date.parse` of the string `b[s, e)` (a JSON string without escapes). Entries are written in time
 * order, so most share the minute of the one before: for `YYYY-MM-DDTHH:MM:SS.sssZ` whose first 16
 * bytes are the remembered minute, the seconds and milliseconds are added to it, which is what
 * Date.parse gives (seconds 00-59; a minute is remembered only if it parses and its hour is not 24,
 * which V8 accepts only as 24:00:00.000).
 */
function timeValue(b: Buffer, s: number, e: number): number {
  if (
    e - s === 24 &&
    b[s + 16] === 0x3a &&
    digit(b[s + 17]) &&
    b[s + 17]! <= 0x35 &&
    digit(b[s + 18]) &&
    b[s + 19] === 0x2e &&
    digit(b[s + 20]) &&
    digit(b[s + 21]) &&
    digit(b[s + 22]) &&
    b[s + 23] === 0x5a
  ) {
    const seconds = (b[s + 17]! - 0x30) * 10 + (b[s + 18]! - 0x30);
    const millis = (b[s + 20]! - 0x30) * 100 + (b[s + 21]! - 0x30) * 10 + (b[s + 22]! - 0x30);
    if (!Number.isNaN(minute.ms) && sameMinute(b, s)) return minute.ms + seconds * 1000 + millis;
    const t = Date.parse(b.toString('latin1', s, e));
    const head = b.toString('latin1', s, s + 16);
    if (!Number.isNaN(t) && /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}$/.test(head) && !head.startsWith('24', 11)) {
      b.copy(minute.bytes, 0, s, s + 16);
      minute.ms = t - seconds * 1000 - millis;
    }
    return t;
  }
  let high = 0;
  for (let k = s; k < e; k++) high |= b[k]!;
  return Date.parse(b.toString(high >= 0x80 ? 'utf8' : 'latin1', s, e));
}

/**
 * The captured patients of the last scan in UTF-8 byte order (which is code point order, the order of
 * audit-index.ts), each distinct value once: indexes into `scanned.patients`.
 */
function sortedPatients(b: Buffer): number[] {
  const at = Array.from({ length: scanned.patientCount }, (_, k) => k);
  const p = scanned.patients;
  const cmp = (x: number, y: number) => b.compare(b, p[2 * y]!, p[2 * y + 1]!, p[2 * x]!, p[2 * x + 1]!);
  at.sort(cmp);
  return at.filter((k, i) => i === 0 || cmp(at[i - 1]!, k) !== 0);
}

/**
 * Drops each attempt whose outcome follows in the same batch with no other event of that request id
 * between: verify applies the events to a set in order (attempt: add, outcome: delete), and add then
 * delete leaves the set exactly as the delete alone does. Keeps the main thread's work, and what
 * crosses threads, small when writes have outcomes.
 */
function compressEvents(kinds: number[], ids: unknown[]): { eventKinds: number[]; eventIds: unknown[] } {
  const open = new Map<unknown, number>();
  const keep = new Uint8Array(kinds.length).fill(1);
  let dropped = 0;
  for (let i = 0; i < kinds.length; i++) {
    if (kinds[i] === 1) {
      open.set(ids[i], i);
    } else {
      const j = open.get(ids[i]);
      if (j !== undefined) {
        keep[j] = 0;
        dropped++;
        open.delete(ids[i]);
      }
    }
  }
  if (dropped === 0) return { eventKinds: kinds, eventIds: ids };
  return {
    eventKinds: kinds.filter((_, i) => keep[i] === 1),
    eventIds: ids.filter((_, i) => keep[i] === 1),
  };
}

const nodeInput = Buffer.alloc(1 + 2 * HASH);

/**
 * MTH of 256 leaf hashes (latin1 strings of 32 bytes), level by level in place: 255 node hashes.
 * Hashes stay one-byte strings between calls, which costs less than a Buffer per hash.
 */
function groupRoot(row: string[]): string {
  nodeInput[0] = 1;
  for (let width = GROUP; width > 1; width >>= 1) {
    for (let j = 0; j < width >> 1; j++) {
      nodeInput.write(row[2 * j]!, 1, HASH, 'latin1');
      nodeInput.write(row[2 * j + 1]!, 1 + HASH, HASH, 'latin1');
      row[j] = hash('sha256', nodeInput, 'binary');
    }
  }
  return row[0]!;
}

/**
 * What the last successful {@link scanEntry} found: phase 1 attempt, 2 outcome, 0 anything else, the
 * request id; and the fields of the query index (audit-index.ts): `fields` holds [start, end) of each
 * string value in slot order (time, action, outcome, purpose, projectId, actor.clientId, actor.userId;
 * start -1 when absent or not a string), `patients` the non-empty strings of `patients`. `index` is
 * false when those could not be read without decoding (an escape in one of them or in a key of
 * `actor`, a repeated key): the caller then parses.
 */
const scanned = {
  phase: 0,
  idStart: 0,
  idEnd: 0,
  index: true,
  fields: new Int32Array(14),
  patients: new Int32Array(64),
  patientCount: 0,
};

/** Keys read by the scan. Top level: 1 phase, 2 requestId, 3..7 the slots time..projectId, 8 actor,
 * 9 patients; in `actor`: 10 clientId, 11 userId; 12 an element of `patients`. */
const F_PHASE = 1;
const F_REQUEST_ID = 2;
const F_ACTOR = 8;
const F_PATIENTS = 9;
const F_PATIENT = 12;
/** The slot in `scanned.fields` of a key's string value (codes 3..7, 10, 11), else -1. */
const SLOT_OF = [-1, -1, -1, 0, 1, 2, 3, 4, -1, -1, 5, 6, -1];
const word = (s: string) => Buffer.from(s);
const K_PHASE = word('phase');
const K_ACTOR = word('actor');
const K_TIME = word('time');
const K_ACTION = word('action');
const K_OUTCOME = word('outcome');
const K_PURPOSE = word('purpose');
const K_PATIENTS = word('patients');
const K_REQUEST_ID = word('requestId');
const K_PROJECT_ID = word('projectId');
const K_CLIENT_ID = word('clientId');
const K_USER_ID = word('userId');

/** The code of a top-level key `b[s, e)` (without escapes), 0 for keys verify does not read. */
function topKey(b: Uint8Array, s: number, e: number): number {
  const c = b[s];
  switch (e - s) {
    case 4:
      return c === 0x74 && rawEquals(b, s, e, K_TIME) ? 3 : 0;
    case 5:
      return c === 0x70 && rawEquals(b, s, e, K_PHASE)
        ? F_PHASE
        : c === 0x61 && rawEquals(b, s, e, K_ACTOR)
          ? F_ACTOR
          : 0;
    case 6:
      return c === 0x61 && rawEquals(b, s, e, K_ACTION) ? 4 : 0;
    case 7:
      return c === 0x6f && rawEquals(b, s, e, K_OUTCOME)
        ? 5
        : c === 0x70 && rawEquals(b, s, e, K_PURPOSE)
          ? 6
          : 0;
    case 8:
      return c === 0x70 && rawEquals(b, s, e, K_PATIENTS) ? F_PATIENTS : 0;
    case 9:
      return c === 0x72 && rawEquals(b, s, e, K_REQUEST_ID)
        ? F_REQUEST_ID
        : c === 0x70 && rawEquals(b, s, e, K_PROJECT_ID)
          ? 7
          : 0;
    default:
      return 0;
  }
}

/** The code of a key of `actor`. */
function actorKey(b: Uint8Array, s: number, e: number): number {
  return rawEquals(b, s, e, K_CLIENT_ID) ? 10 : rawEquals(b, s, e, K_USER_ID) ? 11 : 0;
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const ATTEMPT = Buffer.from('attempt');
const OUTCOME = Buffer.from('outcome');

/** Bytes that stand for themselves inside a JSON string: not a control character, quote or backslash. */
const PLAIN = new Uint8Array(256).map((_, c) => (c >= 0x20 && c !== QUOTE && c !== BACKSLASH ? 1 : 0));

/** Open containers while scanning: 1 object, 2 array (deeper entries are left to JSON.parse). */
const STACK = new Uint8Array(64);

function isWs(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

function rawEquals(b: Uint8Array, start: number, end: number, word: Uint8Array): boolean {
  if (end - start !== word.length) return false;
  for (let k = 0; k < word.length; k++) if (b[start + k] !== word[k]) return false;
  return true;
}

/**
 * A fast path for `JSON.parse(entry)` on the common case, as exact as the parse itself: true only when
 * `b[start, end)` decodes (UTF-8) to one JSON text that JSON.parse accepts and whose value is an
 * object; it then leaves in {@link scanned} what verify reads from that object: `phase` and, for an
 * attempt or outcome, `requestId`, and (with `capture`) the fields of its query index rows. Anything
 * it is not sure of (another top-level value, a top-level key with an escape or twice, an escaped or
 * non-string phase of a write, nesting deeper than 64) returns false, and the caller parses. A byte ≥ 0x80 is a character
 * inside a string and an error outside one, as after UTF-8 decoding: a decoder never consumes an ASCII
 * byte into a replacement character.
 */
export function scanEntry(b: Uint8Array, start: number, end: number, capture = true): boolean {
  let depth = 0;
  let i = start;
  let phaseSeen = 0;
  let idSeen = 0;
  let phase = 0;
  let idStart = 0;
  let idEnd = 0;
  let idIsString = false;
  /** The key whose value comes next (see F_PHASE …), 0 another. */
  let field = 0;
  /** Top-level keys of the index seen (bit per code), and keys seen in `actor`. */
  let seen = 0;
  /** Depth 2 is the `actor` object (1) or the `patients` array (2). */
  let inner = 0;
  const fields = scanned.fields;
  if (capture) fields.fill(-1);
  let index = true;
  let patientCount = 0;
  while (i < end && isWs(b[i]!)) i++;
  if (i >= end || b[i] !== 0x7b) return false;
  let expectValue = true;
  let expectKey = false;
  for (;;) {
    if (expectKey) {
      // A key and its colon at i (after whitespace).
      while (i < end && isWs(b[i]!)) i++;
      if (b[i] !== QUOTE) return false;
      const ks = i + 1;
      const ke = scanString(b, i, end);
      if (ke < 0) return false;
      field = 0;
      if (depth === 1) {
        if (escaped) return false;
        field = topKey(b, ks, ke);
        if (field === F_PHASE) {
          if (phaseSeen++ > 0) return false;
        } else if (field === F_REQUEST_ID) {
          if (idSeen++ > 0) return false;
        } else if (!capture) {
          field = 0;
        } else if (field !== 0) {
          // JSON.parse keeps the last of repeated keys: leave those to it.
          if (seen & (1 << field)) index = false;
          seen |= 1 << field;
        }
      } else if (depth === 2 && inner === 1) {
        // A key of `actor`: an escaped one could spell clientId.
        if (escaped) index = false;
        else {
          field = actorKey(b, ks, ke);
          if (field !== 0) {
            if (seen & (1 << field)) index = false;
            seen |= 1 << field;
          }
        }
      }
      i = ke + 1;
      while (i < end && isWs(b[i]!)) i++;
      if (b[i] !== 0x3a) return false;
      i++;
      expectKey = false;
      expectValue = true;
      continue;
    }
    if (expectValue) {
      // A value starts at i (after whitespace).
      while (i < end && isWs(b[i]!)) i++;
      if (i >= end) return false;
      const c = b[i]!;
      const of = depth === 1 ? field : depth === 2 ? (inner === 1 ? field : inner === 2 ? F_PATIENT : 0) : 0;
      field = 0;
      if (of === F_REQUEST_ID) idIsString = c === QUOTE;
      if (c === 0x7b || c === 0x5b) {
        if (depth === STACK.length) return false;
        STACK[depth++] = c === 0x7b ? 1 : 2;
        if (depth === 2) inner = of === F_ACTOR && c === 0x7b ? 1 : of === F_PATIENTS && c === 0x5b ? 2 : 0;
        i++;
        while (i < end && isWs(b[i]!)) i++;
        if (i >= end) return false;
        if (b[i] === (c === 0x7b ? 0x7d : 0x5d)) {
          depth--;
          if (depth < 2) inner = 0;
          i++;
          expectValue = false;
        } else if (c === 0x7b) {
          expectKey = true;
        }
        continue;
      }
      if (c === QUOTE) {
        const se = scanString(b, i, end);
        if (se < 0) return false;
        if (of === F_PHASE) {
          // An escaped phase might spell attempt or outcome: let JSON.parse decide.
          if (escaped) return false;
          phase = rawEquals(b, i + 1, se, ATTEMPT) ? 1 : rawEquals(b, i + 1, se, OUTCOME) ? 2 : 0;
        } else if (of === F_REQUEST_ID) {
          if (escaped) idIsString = false;
          idStart = i + 1;
          idEnd = se;
        } else if (of === F_PATIENT) {
          if (escaped) index = false;
          else if (se > i + 1) {
            if (2 * patientCount + 2 > scanned.patients.length) {
              const more = new Int32Array(scanned.patients.length * 2);
              more.set(scanned.patients);
              scanned.patients = more;
            }
            scanned.patients[2 * patientCount] = i + 1;
            scanned.patients[2 * patientCount + 1] = se;
            patientCount++;
          }
        } else if (of !== 0 && SLOT_OF[of]! >= 0) {
          if (escaped) index = false;
          fields[2 * SLOT_OF[of]!] = i + 1;
          fields[2 * SLOT_OF[of]! + 1] = se;
        }
        i = se + 1;
      } else if (c === 0x2d || (c >= 0x30 && c <= 0x39)) {
        i = scanNumber(b, i, end);
        if (i < 0) return false;
      } else if (c === 0x74 && b[i + 1] === 0x72 && b[i + 2] === 0x75 && b[i + 3] === 0x65 && i + 4 <= end) {
        i += 4;
      } else if (
        c === 0x66 &&
        b[i + 1] === 0x61 &&
        b[i + 2] === 0x6c &&
        b[i + 3] === 0x73 &&
        b[i + 4] === 0x65 &&
        i + 5 <= end
      ) {
        i += 5;
      } else if (c === 0x6e && b[i + 1] === 0x75 && b[i + 2] === 0x6c && b[i + 3] === 0x6c && i + 4 <= end) {
        i += 4;
      } else {
        return false;
      }
      expectValue = false;
      continue;
    }
    // After a value: a comma, the end of its container, or the end of the text.
    while (i < end && isWs(b[i]!)) i++;
    if (depth === 0) {
      if (i !== end) return false;
      break;
    }
    if (i >= end) return false;
    const c = b[i]!;
    const container = STACK[depth - 1];
    if (c === 0x2c) {
      i++;
      if (container === 1) expectKey = true;
      else expectValue = true;
    } else if ((c === 0x7d && container === 1) || (c === 0x5d && container === 2)) {
      depth--;
      if (depth < 2) inner = 0;
      i++;
    } else {
      return false;
    }
  }
  // A write's event needs its request id as JSON.parse would give it: a plain string here.
  if (phase !== 0 && idSeen > 0 && !idIsString) return false;
  scanned.phase = phase;
  scanned.idStart = idSeen > 0 ? idStart : 0;
  scanned.idEnd = idSeen > 0 ? idEnd : 0;
  scanned.index = index;
  scanned.patientCount = patientCount;
  return true;
}

/**
 * {@link scanEntry} as a value, for tests: undefined when the caller must parse, else whether the entry
 * is a write attempt (1) or outcome (2) and its request id.
 */
export function scanEvent(
  b: Uint8Array,
  start = 0,
  end = b.length,
): { kind: number; requestId?: string } | undefined {
  if (!scanEntry(b, start, end)) return undefined;
  if (scanned.phase === 0 || scanned.idEnd <= scanned.idStart) return { kind: 0 };
  return {
    kind: scanned.phase,
    requestId: Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString(
      'utf8',
      scanned.idStart,
      scanned.idEnd,
    ),
  };
}

/** Whether the string {@link scanString} passed last holds an escape. */
let escaped = false;

/** From the opening quote at i: the index of the closing quote, or -1 if the string is not valid JSON. */
function scanString(b: Uint8Array, i: number, end: number): number {
  escaped = false;
  i++;
  while (i < end) {
    // Plain bytes first: one table look-up each.
    while (i < end && PLAIN[b[i]!] === 1) i++;
    if (i >= end) return -1;
    const c = b[i]!;
    if (c === QUOTE) return i;
    if (c < 0x20) return -1;
    if (c === BACKSLASH) {
      escaped = true;
      const n = b[i + 1];
      if (n === 0x75) {
        for (let k = 2; k < 6; k++) {
          const h = b[i + k];
          if (h === undefined || i + k >= end || !isHex(h)) return -1;
        }
        i += 6;
        continue;
      }
      if (
        i + 1 >= end ||
        !(
          n === QUOTE ||
          n === BACKSLASH ||
          n === 0x2f ||
          n === 0x62 ||
          n === 0x66 ||
          n === 0x6e ||
          n === 0x72 ||
          n === 0x74
        )
      )
        return -1;
      i += 2;
      continue;
    }
    i++;
  }
  return -1;
}

function isHex(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);
}

const isDigit = (c: number | undefined) => c !== undefined && c >= 0x30 && c <= 0x39;

/** From a number's first byte at i: the index after it, or -1 (RFC 8259 §6 grammar). */
function scanNumber(b: Uint8Array, i: number, end: number): number {
  if (b[i] === 0x2d) i++;
  if (i >= end) return -1;
  if (b[i] === 0x30) i++;
  else if (isDigit(b[i]) && b[i] !== 0x30) while (i < end && isDigit(b[i])) i++;
  else return -1;
  if (i < end && b[i] === 0x2e) {
    i++;
    if (i >= end || !isDigit(b[i])) return -1;
    while (i < end && isDigit(b[i])) i++;
  }
  if (i < end && (b[i] === 0x65 || b[i] === 0x45)) {
    i++;
    if (i < end && (b[i] === 0x2b || b[i] === 0x2d)) i++;
    if (i >= end || !isDigit(b[i])) return -1;
    while (i < end && isDigit(b[i])) i++;
  }
  return i;
}

/** The signed big-endian 32-bit integer at `o` (bounds checked by the caller). */
function int32(b: Uint8Array, o: number): number {
  return (b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!;
}

const SIGNATURE = Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1');

/** The COPY BINARY header (signature, flags, no extension). */
export function copyHeader(): Buffer {
  return Buffer.concat([SIGNATURE, Buffer.alloc(8)]);
}

/** Rows read with SELECT, as COPY BINARY tuples (no header). */
export function packRows(rows: readonly { seq: number; entry: Uint8Array; leafHash: Uint8Array }[]): Buffer {
  let size = 0;
  for (const r of rows) size += 2 + 12 + 4 + r.entry.length + 4 + r.leafHash.length;
  const buf = Buffer.allocUnsafe(size);
  let o = 0;
  for (const r of rows) {
    o = buf.writeInt16BE(3, o);
    o = buf.writeInt32BE(8, o);
    o = buf.writeInt32BE(Math.floor(r.seq / 0x1_0000_0000), o);
    o = buf.writeUInt32BE(r.seq >>> 0, o);
    o = buf.writeInt32BE(r.entry.length, o);
    buf.set(r.entry, o);
    o += r.entry.length;
    o = buf.writeInt32BE(r.leafHash.length, o);
    buf.set(r.leafHash, o);
    o += r.leafHash.length;
  }
  return buf;
}

/** A batch of whole tuples, in a buffer of its own (transferable to a worker). */
export interface Batch {
  buf: Buffer;
  count: number;
}

/**
 * Cuts a COPY BINARY stream (seq, entry, leaf_hash) into batches of `batchRows` whole tuples, reading
 * each row's seq on the way (`onSeq`, in order). Chunks may split tuples (and their length fields)
 * anywhere: a small state machine walks the lengths, and each byte is copied once, into its batch.
 */
export class CopySplitter {
  private batch: Buffer;
  private length = 0;
  private rows = 0;
  /** Data bytes still to pass over (a field's value, or the header extension). */
  private skip = 0;
  /** The row ends once `skip` is passed (its last field's value). */
  private rowAfterSkip = false;
  /** The header extension is being passed (it is not copied into batches). */
  private headerAfterSkip = false;
  /** The next fixed-size read: the header, a tuple's field count, a field length, or the seq. */
  private state: 'header' | 'fields' | 'len' | 'seq' | 'done' = 'header';
  private field = 0;
  private readonly scratch = Buffer.alloc(19);
  private have = 0;

  constructor(
    private readonly batchRows: number,
    private readonly onSeq: (seq: number) => void,
  ) {
    this.batch = Buffer.allocUnsafeSlow(1 << 22);
  }

  /** Feeds a chunk; returns the batches it completed. */
  push(chunk: Buffer): Batch[] {
    const out: Batch[] = [];
    const n = chunk.length;
    let p = 0;
    let runStart = 0;
    while (p < n) {
      // Fast path: whole ordinary tuples (3 fields, an 8-byte seq, lengths >= 0) inside this chunk are
      // passed over with a few reads each; anything else (a split tuple, NULL, the trailer) goes on
      // through the state machine below.
      if (this.state === 'fields' && this.skip === 0 && this.have === 0) {
        const c = chunk;
        while (p + 18 <= n && c[p] === 0 && c[p + 1] === 3 && int32(c, p + 2) === 8) {
          const entryLen = int32(c, p + 14);
          const leafAt = p + 18 + entryLen;
          if (entryLen < 0 || leafAt + 4 > n) break;
          const leafLen = int32(c, leafAt);
          const end = leafAt + 4 + leafLen;
          if (leafLen < 0 || end > n) break;
          this.onSeq(int32(c, p + 6) * 0x1_0000_0000 + (int32(c, p + 10) >>> 0));
          p = end;
          if (++this.rows === this.batchRows) {
            this.append(c, runStart, p);
            runStart = p;
            out.push(this.take());
          }
        }
        if (p >= n) break;
      }
      if (this.skip > 0) {
        const k = Math.min(this.skip, n - p);
        this.skip -= k;
        p += k;
        if (this.skip > 0) break;
        if (this.headerAfterSkip) {
          this.headerAfterSkip = false;
          runStart = p;
        }
        if (this.rowAfterSkip) {
          this.rowAfterSkip = false;
          if (++this.rows === this.batchRows) {
            this.append(chunk, runStart, p);
            runStart = p;
            out.push(this.take());
          }
        }
        continue;
      }
      if (this.state === 'done') break;
      const need = this.state === 'header' ? 19 : this.state === 'fields' ? 2 : this.state === 'len' ? 4 : 8;
      // The fixed-size value, in the chunk or gathered across chunks in `scratch`.
      let f = chunk;
      let at = p;
      if (this.have === 0 && p + need <= n) {
        p += need;
      } else {
        const k = Math.min(need - this.have, n - p);
        chunk.copy(this.scratch, this.have, p, p + k);
        this.have += k;
        p += k;
        if (this.have < need) break;
        f = this.scratch;
        at = 0;
        this.have = 0;
      }
      if (this.state === 'header') {
        if (!f.subarray(at, at + SIGNATURE.length).equals(SIGNATURE))
          throw new Error('not a COPY BINARY stream');
        this.state = 'fields';
        this.skip = f.readUInt32BE(at + 15);
        runStart = p;
        if (this.skip > 0) this.headerAfterSkip = true;
      } else if (this.state === 'fields') {
        const fields = f.readInt16BE(at);
        if (fields === -1) {
          // The trailer: not copied (its first byte may already be, from the previous chunk).
          this.state = 'done';
          const inChunk = p - Math.max(runStart, p - 2);
          this.append(chunk, runStart, p - inChunk);
          this.length -= 2 - inChunk;
          runStart = p;
          break;
        }
        if (fields !== 3) throw new Error('unexpected COPY tuple');
        this.field = 0;
        this.state = 'len';
      } else if (this.state === 'len') {
        const len = f.readInt32BE(at);
        if (this.field === 0 && len === 8) {
          this.state = 'seq';
          continue;
        }
        if (this.field === 0) this.onSeq(Number.NaN);
        this.skip = Math.max(len, 0);
        if (++this.field === 3) {
          this.state = 'fields';
          if (this.skip > 0) this.rowAfterSkip = true;
          else if (++this.rows === this.batchRows) {
            this.append(chunk, runStart, p);
            runStart = p;
            out.push(this.take());
          }
        }
      } else {
        this.onSeq(f.readInt32BE(at) * 0x1_0000_0000 + f.readUInt32BE(at + 4));
        this.field = 1;
        this.state = 'len';
      }
    }
    // Header bytes are never copied; everything else up to here is.
    if (this.state !== 'done' && this.state !== 'header' && !this.headerAfterSkip)
      this.append(chunk, runStart, p);
    return out;
  }

  private append(buf: Buffer, from: number, to: number): void {
    if (to <= from) return;
    if (this.length + (to - from) > this.batch.length) {
      const bigger = Buffer.allocUnsafeSlow(Math.max(this.batch.length * 2, this.length + (to - from)));
      this.batch.copy(bigger, 0, 0, this.length);
      this.batch = bigger;
    }
    buf.copy(this.batch, this.length, from, to);
    this.length += to - from;
  }

  /** Batch buffers handed back once processed ({@link recycle}): fresh memory costs a page fault per 4 KiB. */
  private readonly spare: ArrayBuffer[] = [];

  /** Gives back the memory of a batch this splitter made, once nothing reads it any more. */
  recycle(buf: ArrayBuffer): void {
    if (this.spare.length < 16) this.spare.push(buf);
  }

  private fresh(size: number): Buffer {
    const i = this.spare.findIndex((b) => b.byteLength >= size);
    if (i < 0) return Buffer.allocUnsafeSlow(size);
    const b = this.spare.splice(i, 1)[0]!;
    return Buffer.from(b, 0, b.byteLength);
  }

  private take(): Batch {
    const b = { buf: this.batch.subarray(0, this.length), count: this.rows };
    this.batch = this.fresh(Math.max(1 << 16, Math.ceil(this.length * 1.25)));
    this.length = 0;
    this.rows = 0;
    return b;
  }

  /** The last, partial batch once the stream has ended (a stream must end with the COPY trailer). */
  end(): Batch | undefined {
    if (this.state !== 'done' && (this.state !== 'header' || this.have > 0))
      throw new Error('COPY stream cut short');
    return this.rows > 0 ? this.take() : undefined;
  }
}
