import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { canonicalJson, leafHash } from '../src/audit/audit-event.ts';
import { MerkleAccumulator } from '../src/audit/merkle-proof.ts';
import { CopySplitter, copyHeader, packRows, processBatch, scanEvent } from '../src/audit/verify-batch.ts';
import { FIRST_MS, LAST_MS, writeMicros } from '../src/audit/audit-index.ts';

// The per-entry work of `custos audit verify`: the COPY stream splitter and the JSON fast path must
// give exactly what the plain code (JSON.parse on the decoded entry) gives.

/** What verify reads from an entry, the plain way (audit-verify.ts before its fast path). */
function reference(entry: Buffer): { ok: boolean; kind: number; requestId?: unknown } {
  try {
    const e = JSON.parse(entry.toString('utf8')) as { phase?: string; requestId?: unknown };
    if (e.phase === 'attempt' && e.requestId) return { ok: true, kind: 1, requestId: e.requestId };
    if (e.phase === 'outcome' && e.requestId) return { ok: true, kind: 2, requestId: e.requestId };
    return { ok: true, kind: 0 };
  } catch {
    return { ok: false, kind: 0 };
  }
}

function sampleEntry(phase: string): Buffer {
  return Buffer.from(
    canonicalJson({
      v: 1,
      id: randomUUID(),
      time: new Date().toISOString(),
      phase,
      action: 'read',
      outcome: 'success',
      requestId: randomUUID(),
      projectId: randomUUID(),
      actor: { clientId: randomUUID(), roles: ['a', 'b'] },
      purpose: 'TREAT',
      resource: { type: 'Patient', id: randomUUID(), version: '1' },
      patients: [randomUUID()],
      count: -12.5e3,
      source: { ip: '127.0.0.1' },
    }),
  );
}

const PIECES = [
  '"',
  '\\',
  '\\u00e9',
  '\\u12',
  '\\x',
  '{',
  '}',
  '[',
  ']',
  ',',
  ':',
  ' ',
  '\n',
  '\t',
  '\u0001',
  '\u0000',
  'é',
  '\uFEFF',
  '0',
  '-',
  '.',
  'e',
  '01',
  '1.',
  'true',
  'nul',
  'null',
  '"phase":"attempt",',
  '"phase":"outcome",',
  '"requestId":"r-1",',
  '"requestId":5,',
  '"requestId":"",',
  '"ph\\u0061se":"attempt",',
  '"phase":"att\\u0065mpt",',
  '"requestId":"a\\"b",',
  '"phase":null,',
  '"phase":["attempt"],',
];

function mutate(entry: Buffer): Buffer {
  const s = entry.toString('latin1');
  const at = Math.floor(Math.random() * (s.length + 1));
  const r = Math.random();
  if (r < 0.3) {
    const piece = PIECES[Math.floor(Math.random() * PIECES.length)]!;
    return Buffer.concat([entry.subarray(0, at), Buffer.from(piece), entry.subarray(at)]);
  }
  if (r < 0.5)
    return Buffer.concat([entry.subarray(0, at), entry.subarray(at + 1 + Math.floor(Math.random() * 3))]);
  if (r < 0.6) return entry.subarray(0, at);
  if (r < 0.8) {
    const b = Buffer.from(entry);
    if (b.length > 0) b[Math.floor(Math.random() * b.length)] = Math.floor(Math.random() * 256);
    return b;
  }
  // A top-level key after the opening brace.
  const piece = PIECES.filter((p) => p.endsWith(','))[Math.floor(Math.random() * 8)] ?? '';
  return Buffer.concat([Buffer.from('{'), Buffer.from(piece), entry.subarray(1)]);
}

describe('the JSON fast path of verify', () => {
  test('agrees with JSON.parse on entries and on thousands of mangled ones', () => {
    const fixed = [
      '{}',
      '{"phase":"attempt","requestId":"x"}',
      '{"phase":"attempt","requestId":"x","phase":"access"}',
      '{"phase":"outcome","requestId":7}',
      '{"phase":"outcome","requestId":""}',
      '{"phase":"attempt","requestId":"x\\u0041"}',
      '{"phase":"attempt"}',
      '{"a":[1,2,{"phase":"attempt","requestId":"inner"}],"phase":"access"}',
      'null',
      '[]',
      '"attempt"',
      '{"phase":"attempt","requestId":"r"} ',
      ' {"phase":"attempt","requestId":"r"}',
      '{"phase":"attempt","requestId":"r"}x',
      '{"n":-0.5E+3,"m":0,"o":1e5,"t":true,"f":false,"z":null}',
      '{"n":01}',
      '{"n":1.}',
      '{"s":"\u00e9\u2028"}',
      '{"a":1,}',
      '{"a" : 1 , "b" :[ ] }',
      `${'['.repeat(70)}${']'.repeat(70)}`,
      `{"a":${'['.repeat(70)}${']'.repeat(70)}}`,
    ].map((s) => Buffer.from(s));
    const cases: Buffer[] = [...fixed];
    for (let i = 0; i < 300; i++) cases.push(sampleEntry(['access', 'attempt', 'outcome'][i % 3]!));
    for (let i = 0; i < 6000; i++) cases.push(mutate(cases[Math.floor(Math.random() * cases.length)]!));
    cases.push(Buffer.from([0x7b, 0x22, 0xc3, 0x22, 0x3a, 0x31, 0x7d])); // {"<bad utf-8>":1}
    cases.push(Buffer.from([0x7b, 0x22, 0x61, 0x22, 0x3a, 0xe2, 0x80, 0x7d])); // a value of bad bytes
    let fast = 0;
    for (const entry of cases) {
      const want = reference(entry);
      const got = scanEvent(entry);
      if (got === undefined) continue; // the caller parses: the same as the reference by construction
      fast++;
      assert.equal(want.ok, true, `fast path accepted what JSON.parse refuses: ${entry.toString('latin1')}`);
      assert.deepEqual(
        { kind: got.kind, requestId: got.kind ? got.requestId : undefined },
        { kind: want.kind, requestId: want.kind ? want.requestId : undefined },
        entry.toString('latin1'),
      );
    }
    assert.ok(fast > 300, 'the fast path takes the ordinary entries');
  });
});

describe('the COPY stream splitter', () => {
  test('cuts any chunking of a stream into the same batches of whole tuples, with every seq', () => {
    for (let iter = 0; iter < 200; iter++) {
      const n = Math.floor(Math.random() * 1500);
      const rows = Array.from({ length: n }, (_, i) => ({
        seq: i * 3 + 1,
        entry: randomBytes(Math.floor(Math.random() * 60)),
        leafHash: randomBytes(Math.random() < 0.1 ? 5 : 32),
      }));
      const stream = Buffer.concat([copyHeader(), packRows(rows), Buffer.from([0xff, 0xff])]);
      const batchRows = 256 * (1 + Math.floor(Math.random() * 3));
      const seqs: number[] = [];
      const splitter = new CopySplitter(batchRows, (s) => seqs.push(s));
      const batches = [];
      for (let p = 0; p < stream.length;) {
        const k = 1 + Math.floor(Math.random() * (Math.random() < 0.5 ? 6 : 3000));
        batches.push(...splitter.push(stream.subarray(p, p + k)));
        p += k;
      }
      const last = splitter.end();
      if (last) batches.push(last);
      assert.ok(Buffer.concat(batches.map((b) => b.buf)).equals(packRows(rows)));
      assert.equal(
        batches.reduce((a, b) => a + b.count, 0),
        n,
      );
      assert.ok(batches.slice(0, -1).every((b) => b.count === batchRows));
      assert.deepEqual(
        seqs,
        rows.map((r) => r.seq),
      );
    }
    const cut = new CopySplitter(256, () => {});
    cut.push(
      Buffer.concat([
        copyHeader(),
        packRows([{ seq: 0, entry: Buffer.from('{}'), leafHash: Buffer.alloc(32) }]),
      ]),
    );
    assert.throws(() => cut.end(), /cut short/);
  });

  test('a batch: leaf hashes recomputed, the first bad row named, group roots as a tree would have them', () => {
    const entries = Array.from({ length: 600 }, (_, i) =>
      Buffer.from(canonicalJson({ i, phase: i % 7 === 0 ? 'attempt' : 'access', requestId: `r${i}` })),
    );
    const rows = entries.map((entry, seq) => ({ seq, entry, leafHash: leafHash(entry) }));
    rows[300] = { ...rows[300]!, entry: Buffer.from('{"i":300,') }; // undecodable (and its hash differs)
    rows[450] = { ...rows[450]!, leafHash: Buffer.alloc(32) };
    const buf = packRows(rows);
    const copy = Buffer.from(buf);
    const r = processBatch(buf, rows.length);
    assert.ok(buf.equals(copy), 'the batch is left as it was');
    assert.deepEqual(r.bad, { index: 300, seq: 300, problem: 'leaf_hash_mismatch' });
    assert.ok(r.leafHashes.subarray(0, 32).equals(leafHash(entries[0]!)));
    assert.equal(r.roots.length, 2 * 32);
    const tree = new MerkleAccumulator();
    for (let i = 256; i < 512; i++) tree.add(leafHash(rows[i]!.entry));
    assert.ok(r.roots.subarray(32, 64).equals(tree.root()), 'the second group of 256 leaves');
    assert.deepEqual(r.eventKinds.length, Math.ceil(600 / 7));
  });
});

describe('the index rows in binary form', () => {
  test('timestamps are written as PostgreSQL sends them (int64 microseconds since 2000), exactly', () => {
    const out = Buffer.alloc(8);
    const cases = [FIRST_MS, LAST_MS, 0, -1, 1, 946_684_800_000, 946_684_799_999, 1_780_000_000_123];
    for (let i = 0; i < 5000; i++) cases.push(FIRST_MS + Math.floor(Math.random() * (LAST_MS - FIRST_MS)));
    for (const ms of cases) {
      assert.equal(writeMicros(out, 0, ms), 8);
      assert.equal(out.readBigInt64BE(0), (BigInt(ms) - 946_684_800_000n) * 1000n, String(ms));
    }
  });
});
