import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  consistencyProof,
  inclusionProof,
  memoryLeafSource,
  treeHead,
  verifyConsistency,
  verifyInclusion,
  type LeafHashSource,
} from '../src/audit/merkle-proof.ts';
import { leafHash } from '../src/audit/audit-event.ts';

const VECTORS = resolve(fileURLToPath(import.meta.url), '../../../shared/data/tlog-vectors');
const HAVE_VECTORS = existsSync(VECTORS);
const SKIP = HAVE_VECTORS ? false : `test vectors not found at ${VECTORS}`;

function jsonFiles(dir: string): string[] {
  return readdirSync(dir)
    .sort()
    .flatMap((n) => {
      const p = join(dir, n);
      return statSync(p).isDirectory() ? jsonFiles(p) : n.endsWith('.json') ? [p] : [];
    });
}

const b64 = (s: string | null | undefined): Buffer => Buffer.from(s ?? '', 'base64');
const b64s = (a: string[] | null | undefined): Buffer[] => (a ?? []).map(b64);

/** An in-memory source that records the largest range requested, to check that reads are chunked. */
function countingSource(leaves: Buffer[]): LeafHashSource & { maxRead: number } {
  const s = {
    maxRead: 0,
    size: () => Promise.resolve(leaves.length),
    leafHashes: (from: number, to: number) => {
      s.maxRead = Math.max(s.maxRead, to - from);
      return Promise.resolve(leaves.slice(from, to));
    },
  };
  return s;
}

/** Naive recursive MTH, RFC 9162 §2.1.1, as an independent oracle. */
function naiveMth(leaves: Buffer[]): Buffer {
  if (leaves.length === 0) return createHash('sha256').digest();
  if (leaves.length === 1) return leaves[0]!;
  let k = 1;
  while (k * 2 < leaves.length) k *= 2;
  return createHash('sha256')
    .update(Buffer.from([1]))
    .update(naiveMth(leaves.slice(0, k)))
    .update(naiveMth(leaves.slice(k)))
    .digest();
}

function flipBit(b: Buffer, bit: number): Buffer {
  const c = Buffer.from(b);
  c[bit >> 3]! ^= 1 << (bit & 7);
  return c;
}

describe('merkle-proof: self-contained generation and verification', () => {
  it('generates and verifies every inclusion and consistency proof for trees of 1..20 leaves', async () => {
    const leaves = Array.from({ length: 20 }, (_, i) => leafHash(Buffer.from(`entry ${i}`)));
    const src = memoryLeafSource(leaves);
    assert.deepEqual(await treeHead(src, 0), createHash('sha256').digest());
    for (let n = 1; n <= leaves.length; n++) {
      const root = await treeHead(src, n);
      assert.deepEqual(root, naiveMth(leaves.slice(0, n)));
      for (let i = 0; i < n; i++) {
        const proof = await inclusionProof(src, i, n);
        assert.ok(verifyInclusion(i, n, leaves[i]!, proof, root), `inclusion ${i}/${n}`);
        if (n > 1) assert.ok(!verifyInclusion((i + 1) % n, n, leaves[i]!, proof, root));
      }
      for (let m = 1; m <= n; m++) {
        const proof = await consistencyProof(src, m, n);
        const root1 = await treeHead(src, m);
        assert.ok(verifyConsistency(m, n, proof, root1, root), `consistency ${m}->${n}`);
        if (m < n) assert.ok(!verifyConsistency(m, n, proof, root, root1));
      }
    }
  });

  it('rejects invalid arguments without throwing (verify) and with RangeError (generate)', async () => {
    const leaves = [leafHash(Buffer.from('a')), leafHash(Buffer.from('b'))];
    const src = memoryLeafSource(leaves);
    const root = await treeHead(src, 2);
    assert.equal(verifyInclusion(2, 2, leaves[0]!, [leaves[1]!], root), false);
    assert.equal(verifyInclusion(-1, 2, leaves[0]!, [leaves[1]!], root), false);
    assert.equal(verifyInclusion(0.5, 2, leaves[0]!, [leaves[1]!], root), false);
    assert.equal(verifyInclusion(0, 2, Buffer.alloc(31), [leaves[1]!], root), false);
    assert.equal(verifyInclusion(0, 2, leaves[0]!, [leaves[1]!, leaves[1]!], root), false);
    assert.equal(verifyConsistency(0, 0, [], root, root), false);
    assert.equal(verifyConsistency(0, 2, [], root, root), false);
    assert.equal(verifyConsistency(2, 1, [], root, root), false);
    assert.equal(verifyConsistency(2, 2, [], root, root), true);
    assert.equal(verifyConsistency(2, 2, [root], root, root), false);
    await assert.rejects(inclusionProof(src, 2, 2), RangeError);
    await assert.rejects(inclusionProof(src, 0, 3), RangeError);
    await assert.rejects(consistencyProof(src, 0, 2), RangeError);
    await assert.rejects(consistencyProof(src, 2, 1), RangeError);
    await assert.rejects(treeHead(src, 3), RangeError);
    assert.deepEqual(await consistencyProof(src, 2, 2), []);
  });

  it('random property test over 200 leaves: proofs verify, any bit flip fails, reads are chunked', async () => {
    const leaves = Array.from({ length: 200 }, () => leafHash(randomBytes(16)));
    const src = countingSource(leaves);
    for (let iter = 0; iter < 60; iter++) {
      const n = 1 + Math.floor(Math.random() * leaves.length);
      const i = Math.floor(Math.random() * n);
      const m = 1 + Math.floor(Math.random() * n);
      const root = await treeHead(src, n);
      assert.deepEqual(root, naiveMth(leaves.slice(0, n)));
      const inc = await inclusionProof(src, i, n);
      assert.ok(verifyInclusion(i, n, leaves[i]!, inc, root));
      if (inc.length > 0) {
        const j = Math.floor(Math.random() * inc.length);
        const bad = inc.map((p, k) => (k === j ? flipBit(p, Math.floor(Math.random() * 256)) : p));
        assert.ok(!verifyInclusion(i, n, leaves[i]!, bad, root), `flipped inclusion ${i}/${n}`);
      }
      assert.ok(!verifyInclusion(i, n, flipBit(leaves[i]!, Math.floor(Math.random() * 256)), inc, root));
      assert.ok(!verifyInclusion(i, n, leaves[i]!, inc, flipBit(root, Math.floor(Math.random() * 256))));
      const root1 = await treeHead(src, m);
      const con = await consistencyProof(src, m, n);
      assert.ok(verifyConsistency(m, n, con, root1, root), `consistency ${m}->${n}`);
      if (con.length > 0) {
        const j = Math.floor(Math.random() * con.length);
        const bad = con.map((p, k) => (k === j ? flipBit(p, Math.floor(Math.random() * 256)) : p));
        assert.ok(!verifyConsistency(m, n, bad, root1, root), `flipped consistency ${m}->${n}`);
      }
      if (m < n) {
        assert.ok(!verifyConsistency(m, n, con, flipBit(root1, 0), root));
        assert.ok(!verifyConsistency(m, n, con, root1, flipBit(root, 255)));
      }
    }
    assert.ok(src.maxRead <= 4096);
  });
});

describe('merkle-proof: transparency-dev/merkle vectors', { skip: SKIP }, () => {
  const base = join(VECTORS, 'transparency-dev-merkle');
  const inclusion = HAVE_VECTORS ? jsonFiles(join(base, 'inclusion')) : [];
  const consistency = HAVE_VECTORS ? jsonFiles(join(base, 'consistency')) : [];

  it('has all 196 proof files', () => {
    assert.equal(inclusion.length, 98);
    assert.equal(consistency.length, 98);
  });

  for (const file of inclusion) {
    it(`inclusion ${relative(base, file)}`, () => {
      const v = JSON.parse(readFileSync(file, 'utf8')) as {
        leafIdx: number;
        treeSize: number;
        root: string | null;
        leafHash: string | null;
        proof: string[] | null;
        wantErr: boolean;
      };
      const ok = verifyInclusion(v.leafIdx, v.treeSize, b64(v.leafHash), b64s(v.proof), b64(v.root));
      assert.equal(ok, !v.wantErr);
    });
  }

  for (const file of consistency) {
    it(`consistency ${relative(base, file)}`, () => {
      const v = JSON.parse(readFileSync(file, 'utf8')) as {
        size1: number;
        size2: number;
        root1: string | null;
        root2: string | null;
        proof: string[] | null;
        wantErr: boolean;
      };
      const ok = verifyConsistency(v.size1, v.size2, b64s(v.proof), b64(v.root1), b64(v.root2));
      assert.equal(ok, !v.wantErr);
    });
  }
});

describe('merkle-proof: RFC 6962 reference tree', { skip: SKIP }, () => {
  const tree = HAVE_VECTORS
    ? (JSON.parse(readFileSync(join(VECTORS, 'rfc6962-reference-tree.json'), 'utf8')) as {
        emptyRootHash: string;
        leafInputsHex: string[];
        rootHashesBySize: string[];
      })
    : { emptyRootHash: '', leafInputsHex: [], rootHashesBySize: [] };
  const leaves = tree.leafInputsHex.map((h) => leafHash(Buffer.from(h, 'hex')));
  const src = memoryLeafSource(leaves);

  it('tree heads match rootHashesBySize for sizes 0..8', async () => {
    assert.equal(tree.rootHashesBySize.length, 9);
    assert.equal((await treeHead(src, 0)).toString('hex'), tree.emptyRootHash);
    for (let n = 0; n <= 8; n++) {
      assert.equal((await treeHead(src, n)).toString('hex'), tree.rootHashesBySize[n]);
    }
  });

  it('generated inclusion proofs verify for every leaf of every size 1..8', async () => {
    let count = 0;
    for (let n = 1; n <= 8; n++) {
      const root = Buffer.from(tree.rootHashesBySize[n]!, 'hex');
      for (let i = 0; i < n; i++) {
        assert.ok(verifyInclusion(i, n, leaves[i]!, await inclusionProof(src, i, n), root), `${i}/${n}`);
        count++;
      }
    }
    assert.equal(count, 36);
  });

  it('generated consistency proofs verify for every 1 <= size1 <= size2 <= 8', async () => {
    let count = 0;
    for (let n = 1; n <= 8; n++) {
      for (let m = 1; m <= n; m++) {
        const r1 = Buffer.from(tree.rootHashesBySize[m]!, 'hex');
        const r2 = Buffer.from(tree.rootHashesBySize[n]!, 'hex');
        assert.ok(verifyConsistency(m, n, await consistencyProof(src, m, n), r1, r2), `${m}->${n}`);
        count++;
      }
    }
    assert.equal(count, 36);
  });
});
