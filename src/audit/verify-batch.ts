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
import { hash } from 'node:crypto';

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
}

/** Processes `count` tuples packed in `buf` (no COPY header or trailer). `buf` is left as it was. */
export function processBatch(buf: Buffer, count: number): BatchResult {
  const leafHashes = Buffer.from(new ArrayBuffer(count * HASH));
  const groups = Math.floor(count / GROUP);
  const roots = Buffer.from(new ArrayBuffer(groups * HASH));
  let bad: BatchResult['bad'];
  const eventKinds: number[] = [];
  const eventIds: unknown[] = [];
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
    leafHashes.write(
      hash('sha256', buf.subarray(entryStart - 1, entryEnd), 'binary'),
      i * HASH,
      HASH,
      'latin1',
    );
    buf[entryStart - 1] = saved;
    const mismatch =
      leafLen !== HASH ||
      leafHashes.compare(buf, leafStart, leafStart + HASH, i * HASH, (i + 1) * HASH) !== 0;
    let undecodable = false;
    if (scanEntry(buf, entryStart, entryEnd)) {
      // Valid JSON, an object: the event fields were read by the scan (see scanEntry).
      if (scanned.phase !== 0 && scanned.idEnd > scanned.idStart) {
        eventKinds.push(scanned.phase);
        eventIds.push(buf.toString('utf8', scanned.idStart, scanned.idEnd));
      }
    } else {
      try {
        const e = JSON.parse(buf.toString('utf8', entryStart, entryEnd)) as {
          phase?: string;
          requestId?: string;
        };
        if (e.phase === 'attempt' && e.requestId) {
          eventKinds.push(1);
          eventIds.push(e.requestId);
        }
        if (e.phase === 'outcome' && e.requestId) {
          eventKinds.push(2);
          eventIds.push(e.requestId);
        }
      } catch {
        undecodable = true;
      }
    }
    if (bad === undefined && (mismatch || undecodable)) {
      bad = { index: i, seq, problem: mismatch ? 'leaf_hash_mismatch' : 'undecodable_entry' };
    }
  }
  // Each whole group's root: 255 node hashes over a working copy, level by level.
  const row = Buffer.alloc(GROUP * HASH);
  const input = Buffer.alloc(1 + 2 * HASH);
  input[0] = 1;
  for (let g = 0; g < groups; g++) {
    leafHashes.copy(row, 0, g * GROUP * HASH, (g + 1) * GROUP * HASH);
    for (let width = GROUP; width > 1; width >>= 1) {
      for (let j = 0; j < width >> 1; j++) {
        row.copy(input, 1, 2 * j * HASH, (2 * j + 2) * HASH);
        row.write(hash('sha256', input, 'binary'), j * HASH, HASH, 'latin1');
      }
    }
    row.copy(roots, g * HASH, 0, HASH);
  }
  return { count, leafHashes, roots, bad, eventKinds, eventIds };
}

/** What the last successful {@link scanEntry} found: phase 1 attempt, 2 outcome, 0 anything else. */
const scanned = { phase: 0, idStart: 0, idEnd: 0 };

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const PHASE = Buffer.from('phase');
const REQUEST_ID = Buffer.from('requestId');
const ATTEMPT = Buffer.from('attempt');
const OUTCOME = Buffer.from('outcome');

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
 * attempt or outcome, `requestId`. Anything it is not sure of (another top-level value, a top-level key
 * with an escape or twice, an escaped or non-string phase of a write, nesting deeper than 64) returns
 * false, and the caller parses. A byte ≥ 0x80 is a character inside a string and an error outside
 * one, as after UTF-8 decoding: a decoder never consumes an ASCII byte into a replacement character.
 */
export function scanEntry(b: Uint8Array, start: number, end: number): boolean {
  const stack = new Uint8Array(64); // 1 object, 2 array
  let depth = 0;
  let i = start;
  const top = { phaseSeen: 0, idSeen: 0, phase: 0, idStart: 0, idEnd: 0, idIsString: false };
  /** The top-level key whose value comes next: 1 phase, 2 requestId, 0 another. */
  let field = 0;
  // Reads a key and its colon at i (the opening quote); false if invalid or a top-level key to avoid.
  const key = (): boolean => {
    if (b[i] !== QUOTE) return false;
    const ks = i + 1;
    const ke = scanString(b, i, end);
    if (ke < 0) return false;
    field = 0;
    if (depth === 1) {
      if (hasBackslash(b, ks, ke)) return false;
      if (rawEquals(b, ks, ke, PHASE)) {
        if (top.phaseSeen++ > 0) return false;
        field = 1;
      } else if (rawEquals(b, ks, ke, REQUEST_ID)) {
        if (top.idSeen++ > 0) return false;
        field = 2;
      }
    }
    i = ke + 1;
    while (i < end && isWs(b[i]!)) i++;
    if (b[i] !== 0x3a) return false;
    i++;
    return true;
  };
  while (i < end && isWs(b[i]!)) i++;
  if (i >= end || b[i] !== 0x7b) return false;
  let expectValue = true;
  for (;;) {
    if (expectValue) {
      // A value starts at i (after whitespace).
      while (i < end && isWs(b[i]!)) i++;
      if (i >= end) return false;
      const c = b[i]!;
      const of = depth === 1 ? field : 0;
      field = 0;
      if (of === 2) top.idIsString = c === QUOTE;
      if (c === 0x7b || c === 0x5b) {
        if (depth === 64) return false;
        stack[depth++] = c === 0x7b ? 1 : 2;
        i++;
        while (i < end && isWs(b[i]!)) i++;
        if (i >= end) return false;
        if (b[i] === (c === 0x7b ? 0x7d : 0x5d)) {
          depth--;
          i++;
          expectValue = false;
        } else if (c === 0x7b && !key()) {
          return false;
        }
        continue;
      }
      if (c === QUOTE) {
        const se = scanString(b, i, end);
        if (se < 0) return false;
        if (of === 1) {
          // An escaped phase might spell attempt or outcome: let JSON.parse decide.
          if (hasBackslash(b, i + 1, se)) return false;
          top.phase = rawEquals(b, i + 1, se, ATTEMPT) ? 1 : rawEquals(b, i + 1, se, OUTCOME) ? 2 : 0;
        } else if (of === 2) {
          if (hasBackslash(b, i + 1, se)) top.idIsString = false;
          top.idStart = i + 1;
          top.idEnd = se;
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
    const container = stack[depth - 1];
    if (c === 0x2c) {
      i++;
      if (container === 1) {
        while (i < end && isWs(b[i]!)) i++;
        if (!key()) return false;
      }
      expectValue = true;
    } else if ((c === 0x7d && container === 1) || (c === 0x5d && container === 2)) {
      depth--;
      i++;
    } else {
      return false;
    }
  }
  // A write's event needs its request id as JSON.parse would give it: a plain string here.
  if (top.phase !== 0 && top.idSeen > 0 && !top.idIsString) return false;
  scanned.phase = top.phase;
  scanned.idStart = top.idSeen > 0 ? top.idStart : 0;
  scanned.idEnd = top.idSeen > 0 ? top.idEnd : 0;
  return true;
}

function hasBackslash(b: Uint8Array, start: number, end: number): boolean {
  for (let k = start; k < end; k++) if (b[k] === BACKSLASH) return true;
  return false;
}

/** From the opening quote at i: the index of the closing quote, or -1 if the string is not valid JSON. */
function scanString(b: Uint8Array, i: number, end: number): number {
  i++;
  while (i < end) {
    const c = b[i]!;
    if (c === QUOTE) return i;
    if (c < 0x20) return -1;
    if (c === BACKSLASH) {
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
 * each row's seq on the way (`onSeq`, in order). Chunks may split tuples anywhere.
 */
export class CopySplitter {
  private carry: Buffer | undefined;
  private header = false;
  private ended = false;
  private batch: Buffer;
  private length = 0;
  private rows = 0;

  constructor(
    private readonly batchRows: number,
    private readonly onSeq: (seq: number) => void,
  ) {
    this.batch = Buffer.allocUnsafeSlow(1 << 20);
  }

  /** Feeds a chunk; returns the batches it completed. */
  push(chunk: Buffer): Batch[] {
    const out: Batch[] = [];
    const buf = this.carry ? Buffer.concat([this.carry, chunk]) : chunk;
    this.carry = undefined;
    let p = 0;
    if (!this.header) {
      if (buf.length < 19) {
        this.carry = Buffer.from(buf);
        return out;
      }
      if (!buf.subarray(0, SIGNATURE.length).equals(SIGNATURE)) throw new Error('not a COPY BINARY stream');
      const ext = buf.readUInt32BE(15);
      if (buf.length < 19 + ext) {
        this.carry = Buffer.from(buf);
        return out;
      }
      p = 19 + ext;
      this.header = true;
    }
    let runStart = p;
    while (!this.ended) {
      if (p + 2 > buf.length) break;
      const fields = buf.readInt16BE(p);
      if (fields === -1) {
        this.ended = true;
        break;
      }
      if (fields !== 3) throw new Error('unexpected COPY tuple');
      // seq, entry, leaf_hash: each a length (-1 for NULL) and that many bytes.
      let q = p + 2;
      let seq = Number.NaN;
      let complete = true;
      for (let f = 0; f < 3; f++) {
        if (q + 4 > buf.length) {
          complete = false;
          break;
        }
        const len = buf.readInt32BE(q);
        q += 4;
        if (f === 0 && len === 8 && q + 8 <= buf.length) {
          seq = buf.readInt32BE(q) * 0x1_0000_0000 + buf.readUInt32BE(q + 4);
        }
        q += Math.max(len, 0);
        if (q > buf.length) {
          complete = false;
          break;
        }
      }
      if (!complete) break;
      this.onSeq(seq);
      this.rows++;
      p = q;
      if (this.rows === this.batchRows) {
        this.append(buf, runStart, p);
        runStart = p;
        out.push(this.take());
      }
    }
    this.append(buf, runStart, p);
    if (p < buf.length && !this.ended) this.carry = Buffer.from(buf.subarray(p));
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

  private take(): Batch {
    const b = { buf: this.batch.subarray(0, this.length), count: this.rows };
    this.batch = Buffer.allocUnsafeSlow(Math.max(1 << 16, Math.ceil(this.length * 1.25)));
    this.length = 0;
    this.rows = 0;
    return b;
  }

  /** The last, partial batch once the stream has ended (a stream must end with the COPY trailer). */
  end(): Batch | undefined {
    if (!this.ended && (this.carry || this.header)) throw new Error('COPY stream cut short');
    return this.rows > 0 ? this.take() : undefined;
  }
}
