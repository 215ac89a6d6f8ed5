/**
 * Merkle inclusion and consistency proofs for the audit log (RFC 9162 §2.1, equivalently RFC 6962 §2.1).
 *
 * The audit log entries are the leaves of an RFC 9162 Merkle tree: leaf hash = SHA-256(0x00 || entry),
 * interior node = SHA-256(0x01 || left || right), empty tree = SHA-256(""). This module only composes
 * SHA-256 (node:crypto) as the RFC prescribes; it introduces no new cryptography.
 *
 * Verification is pure and synchronous and never throws: any malformed input yields `false`.
 * Generation reads leaf hashes from an abstract {@link LeafHashSource} and recomputes the subtree
 * hashes MTH(D[a:b]) it needs by streaming over leaf ranges with a stack of perfect subtrees, so memory
 * stays O(log n) but each proof costs O(n) leaf reads and hashes.
 *
 * TODO(audit issue): persist interior hashes (C2SP tlog-tiles, https://c2sp.org/tlog-tiles) so that
 * proofs cost O(log n) reads instead of re-hashing whole leaf ranges.
 *
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1
 * @module
 */
import { createHash } from 'node:crypto';

/** Size in bytes of every hash handled here (SHA-256). */
export const HASH_SIZE = 32;

/** How many leaf hashes to request from a {@link LeafHashSource} at a time while streaming. */
const READ_CHUNK = 4096;

/** RFC 9162 §2.1.1 interior node hash: SHA-256(0x01 || left || right). */
export function nodeHash(left: Buffer, right: Buffer): Buffer {
  return createHash('sha256')
    .update(Buffer.from([1]))
    .update(left)
    .update(right)
    .digest();
}

function isHash(b: unknown): b is Buffer {
  return Buffer.isBuffer(b) && b.length === HASH_SIZE;
}

function isSize(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
}

const isOdd = (n: number): boolean => n % 2 === 1;
const half = (n: number): number => Math.floor(n / 2);

/** Largest power of two strictly less than n (n >= 2), i.e. the split point k of RFC 9162 §2.1.1. */
function splitPoint(n: number): number {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}

/**
 * Verifies an RFC 9162 §2.1.3.2 inclusion proof: that `leafHash` is the leaf at `leafIndex` of the tree
 * of size `treeSize` whose root is `root`.
 *
 * Returns `false` (never throws) for any invalid input: index out of range, hashes that are not 32 bytes,
 * a proof that is too long or too short, or a root mismatch.
 *
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1.3.2
 */
export function verifyInclusion(
  leafIndex: number,
  treeSize: number,
  leafHash: Buffer,
  proof: Buffer[],
  root: Buffer,
): boolean {
  if (!isSize(leafIndex) || !isSize(treeSize) || leafIndex >= treeSize) return false;
  if (!isHash(leafHash) || !isHash(root) || !Array.isArray(proof) || !proof.every(isHash)) return false;
  let fn = leafIndex;
  let sn = treeSize - 1;
  let r = leafHash;
  for (const p of proof) {
    if (sn === 0) return false;
    if (isOdd(fn) || fn === sn) {
      r = nodeHash(p, r);
      while (!isOdd(fn) && fn !== 0) {
        fn = half(fn);
        sn = half(sn);
      }
    } else {
      r = nodeHash(r, p);
    }
    fn = half(fn);
    sn = half(sn);
  }
  return sn === 0 && r.equals(root);
}

/**
 * Verifies an RFC 9162 §2.1.4.2 consistency proof between the tree of size `size1` with root `root1`
 * and the tree of size `size2` with root `root2`.
 *
 * Matches the transparency-dev/merkle semantics: a proof from size 0 is always invalid (even 0 → 0);
 * for `size1 === size2` the proof must be empty and the roots equal (byte comparison only);
 * `size1 > size2` is invalid; otherwise every hash must be 32 bytes. Returns `false` (never throws) for any invalid input.
 *
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1.4.2
 */
export function verifyConsistency(
  size1: number,
  size2: number,
  proof: Buffer[],
  root1: Buffer,
  root2: Buffer,
): boolean {
  if (!isSize(size1) || !isSize(size2) || size1 === 0 || size1 > size2) return false;
  if (!Buffer.isBuffer(root1) || !Buffer.isBuffer(root2) || !Array.isArray(proof)) return false;
  // Equal sizes: the roots are only compared (transparency-dev/merkle does not length-check them here).
  if (size1 === size2) return proof.length === 0 && root1.equals(root2);
  if (!isHash(root1) || !isHash(root2) || !proof.every(isHash)) return false;
  if (proof.length === 0) return false;
  // Step 2: if size1 is an exact power of two, the first tree's root is the first proof node.
  const path = isPowerOfTwo(size1) ? [root1, ...proof] : proof;
  let fn = size1 - 1;
  let sn = size2 - 1;
  while (isOdd(fn)) {
    fn = half(fn);
    sn = half(sn);
  }
  let fr = path[0]!;
  let sr = path[0]!;
  for (let i = 1; i < path.length; i++) {
    const c = path[i]!;
    if (sn === 0) return false;
    if (isOdd(fn) || fn === sn) {
      fr = nodeHash(c, fr);
      sr = nodeHash(c, sr);
      while (!isOdd(fn) && fn !== 0) {
        fn = half(fn);
        sn = half(sn);
      }
    } else {
      sr = nodeHash(sr, c);
    }
    fn = half(fn);
    sn = half(sn);
  }
  return sn === 0 && fr.equals(root1) && sr.equals(root2);
}

function isPowerOfTwo(n: number): boolean {
  if (n < 1) return false;
  while (n > 1) {
    if (isOdd(n)) return false;
    n = half(n);
  }
  return true;
}

/**
 * A read-only view of a log's leaf hashes, for proof generation. `leafHashes(from, to)` returns the
 * leaf hashes of the half-open range [from, to), each 32 bytes, in order.
 */
export interface LeafHashSource {
  /** Current number of leaves. */
  size(): Promise<number>;
  /** Leaf hashes for indices in [from, to). */
  leafHashes(from: number, to: number): Promise<Buffer[]>;
}

/**
 * Streaming RFC 9162 §2.1.1 tree head: a stack of perfect subtree roots, O(log n) memory. Used by
 * proof generation and by `custos audit verify`. The empty tree's head is SHA-256("").
 */
export class MerkleAccumulator {
  private stack: { size: number; hash: Buffer }[] = [];
  add(leaf: Buffer): void {
    let node = { size: 1, hash: leaf };
    while (this.stack.length > 0 && this.stack[this.stack.length - 1]!.size === node.size) {
      const left = this.stack.pop()!;
      node = { size: left.size * 2, hash: nodeHash(left.hash, node.hash) };
    }
    this.stack.push(node);
  }
  root(): Buffer {
    if (this.stack.length === 0) return createHash('sha256').digest();
    let acc = this.stack[this.stack.length - 1]!.hash;
    for (let i = this.stack.length - 2; i >= 0; i--) acc = nodeHash(this.stack[i]!.hash, acc);
    return acc;
  }
}

/** MTH(D[from:to]) by streaming the leaf hashes of [from, to) from the source. */
async function subtreeHash(src: LeafHashSource, from: number, to: number): Promise<Buffer> {
  const acc = new MerkleAccumulator();
  for (let at = from; at < to;) {
    const end = Math.min(to, at + READ_CHUNK);
    const leaves = await src.leafHashes(at, end);
    if (leaves.length !== end - at) {
      throw new Error(`leaf source returned ${leaves.length} leaf hashes for [${at}, ${end})`);
    }
    for (const leaf of leaves) {
      if (!isHash(leaf)) throw new Error(`leaf source returned a leaf hash that is not ${HASH_SIZE} bytes`);
      acc.add(leaf);
    }
    at = end;
  }
  return acc.root();
}

async function checkTreeSize(src: LeafHashSource, treeSize: number): Promise<void> {
  if (!isSize(treeSize)) throw new RangeError(`invalid tree size ${treeSize}`);
  const available = await src.size();
  if (treeSize > available) throw new RangeError(`tree size ${treeSize} exceeds log size ${available}`);
}

/**
 * RFC 9162 §2.1.1 Merkle tree head MTH(D[0:size]) over the first `size` leaves of the source.
 * The empty tree's head is SHA-256("").
 *
 * @throws RangeError if `size` is not a non-negative safe integer or exceeds the source's size.
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1.1
 */
export async function treeHead(src: LeafHashSource, size: number): Promise<Buffer> {
  await checkTreeSize(src, size);
  return subtreeHash(src, 0, size);
}

/**
 * Generates the RFC 9162 §2.1.3.1 inclusion proof PATH(leafIndex, D[0:treeSize]), ordered from the
 * leaf's sibling up to the root's child, as {@link verifyInclusion} expects.
 *
 * @throws RangeError if `leafIndex >= treeSize` or `treeSize` exceeds the source's size.
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1.3.1
 */
export async function inclusionProof(
  src: LeafHashSource,
  leafIndex: number,
  treeSize: number,
): Promise<Buffer[]> {
  await checkTreeSize(src, treeSize);
  if (!isSize(leafIndex) || leafIndex >= treeSize) {
    throw new RangeError(`leaf index ${leafIndex} out of range for tree size ${treeSize}`);
  }
  // PATH(m, D[a:b]): for n = b - a > 1 with split k, PATH(m, D[a:a+k]) : MTH(D[a+k:b]) when m < k,
  // else PATH(m - k, D[a+k:b]) : MTH(D[a:a+k]). Collected top-down, returned bottom-up.
  const topDown: Buffer[] = [];
  let a = 0;
  let b = treeSize;
  let m = leafIndex;
  while (b - a > 1) {
    const k = splitPoint(b - a);
    if (m < k) {
      topDown.push(await subtreeHash(src, a + k, b));
      b = a + k;
    } else {
      topDown.push(await subtreeHash(src, a, a + k));
      a = a + k;
      m -= k;
    }
  }
  return topDown.reverse();
}

/**
 * Generates the RFC 9162 §2.1.4.1 consistency proof PROOF(size1, D[0:size2]) = SUBPROOF(size1, D[0:size2], true).
 * Returns an empty proof when `size1 === size2`.
 *
 * @throws RangeError if `size1` is 0 (consistency with the empty tree is not defined), `size1 > size2`,
 *   or `size2` exceeds the source's size.
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1.4.1
 */
export async function consistencyProof(src: LeafHashSource, size1: number, size2: number): Promise<Buffer[]> {
  await checkTreeSize(src, size2);
  if (!isSize(size1) || size1 === 0 || size1 > size2) {
    throw new RangeError(`invalid consistency proof sizes ${size1} -> ${size2}`);
  }
  // SUBPROOF(m, D[a:b], start): if m == n, [] when start else [MTH(D[a:b])]; otherwise with split k,
  // m <= k: SUBPROOF(m, D[a:a+k], start) : MTH(D[a+k:b]); m > k: SUBPROOF(m - k, D[a+k:b], false) : MTH(D[a:a+k]).
  const topDown: Buffer[] = [];
  let a = 0;
  let b = size2;
  let m = size1;
  let start = true;
  while (m !== b - a) {
    const k = splitPoint(b - a);
    if (m <= k) {
      topDown.push(await subtreeHash(src, a + k, b));
      b = a + k;
    } else {
      topDown.push(await subtreeHash(src, a, a + k));
      a = a + k;
      m -= k;
      start = false;
    }
  }
  if (!start) topDown.push(await subtreeHash(src, a, b));
  return topDown.reverse();
}

/** A {@link LeafHashSource} over an in-memory array of leaf hashes (tests, small logs). */
export function memoryLeafSource(leaves: readonly Buffer[]): LeafHashSource {
  return {
    size: () => Promise.resolve(leaves.length),
    leafHashes: (from, to) => Promise.resolve(leaves.slice(from, to)),
  };
}
