/**
 * Merkle inclusion and consistency proofs for the audit log (RFC 9162 §2.1, equivalently RFC 6962 §2.1).
 *
 * The audit log entries are the leaves of an RFC 9162 Merkle tree: leaf hash = SHA-256(0x00 || entry),
 * interior node = SHA-256(0x01 || left || right), empty tree = SHA-256(""). This module only composes
 * SHA-256 (node:crypto) as the RFC prescribes; it introduces no new cryptography.
 *
 * Verification is pure and synchronous and never throws: any malformed input yields `false`.
 * Generation first lists the subtrees MTH(D[a:b]) a proof needs ({@link inclusionRanges},
 * {@link consistencyRanges}), then asks a source for their hashes:
 * - a {@link NodeHashSource} answers with the hashes of perfect, aligned subtrees, which every proof
 *   subtree decomposes into; the tiles of `tiles.ts` (C2SP tlog-tiles) are one, so a proof costs a
 *   few reads per 256-fold level of the tree, O(log n);
 * - a {@link LeafHashSource} (an array, or any leaf list) is streamed with a stack of perfect
 *   subtrees: O(log n) memory, but O(n) leaf reads and hashes.
 *
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1
 * @module
 */
import { createHash, hash } from 'node:crypto';

/** Size in bytes of every hash handled here (SHA-256). */
export const HASH_SIZE = 32;

/** How many leaf hashes to request from a {@link LeafHashSource} at a time while streaming. */
const READ_CHUNK = 4096;

/** SHA-256("") : the head of the empty tree. */
export function emptyRoot(): Buffer {
  return createHash('sha256').digest();
}

const nodeInput = Buffer.alloc(1 + 2 * HASH_SIZE);

/**
 * RFC 9162 §2.1.1 interior node hash: SHA-256(0x01 || left || right). One-shot `crypto.hash` over
 * a reused 65-byte buffer: about half the cost of a `createHash` chain, and it is most of the
 * work of building a tree.
 */
export function nodeHash(left: Buffer, right: Buffer): Buffer {
  if (left.length !== HASH_SIZE || right.length !== HASH_SIZE) {
    return createHash('sha256')
      .update(Buffer.from([1]))
      .update(left)
      .update(right)
      .digest();
  }
  nodeInput[0] = 1;
  left.copy(nodeInput, 1);
  right.copy(nodeInput, 1 + HASH_SIZE);
  return hash('sha256', nodeInput, 'buffer');
}

/**
 * MTH of `count` consecutive hashes in `hashes` (32 bytes each, from byte `offset`), `count` a power
 * of two: the root of a perfect subtree whose bottom row is those hashes. Works on a copy.
 */
export function perfectRoot(hashes: Buffer, count: number, offset = 0): Buffer {
  if (count < 1 || (count & (count - 1)) !== 0) throw new RangeError(`not a power of two: ${count}`);
  if (count === 1) return Buffer.from(hashes.subarray(offset, offset + HASH_SIZE));
  const row = Buffer.from(hashes.subarray(offset, offset + count * HASH_SIZE));
  const input = Buffer.alloc(1 + 2 * HASH_SIZE);
  input[0] = 1;
  for (let width = count; width > 1; width >>= 1) {
    for (let j = 0; j < width >> 1; j++) {
      row.copy(input, 1, 2 * j * HASH_SIZE, (2 * j + 2) * HASH_SIZE);
      hash('sha256', input, 'buffer').copy(row, j * HASH_SIZE);
    }
  }
  return row.subarray(0, HASH_SIZE);
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
  /** Leaves (or entries) added so far. */
  get size(): number {
    return this.stack.reduce((n, s) => n + s.size, 0);
  }
  /** The perfect-subtree roots, left to right: the binary decomposition of the leaves added. */
  roots(): Buffer[] {
    return this.stack.map((s) => s.hash);
  }
  add(leaf: Buffer): void {
    let node = { size: 1, hash: leaf };
    while (this.stack.length > 0 && this.stack[this.stack.length - 1]!.size === node.size) {
      const left = this.stack.pop()!;
      node = { size: left.size * 2, hash: nodeHash(left.hash, node.hash) };
    }
    this.stack.push(node);
  }
  root(): Buffer {
    return foldRoots(this.roots());
  }
}

/**
 * MTH of a sequence of perfect subtrees given left to right, each smaller than the one before it (a
 * binary decomposition): right to left, node(left, acc). The empty sequence is the empty tree.
 */
export function foldRoots(roots: readonly Buffer[]): Buffer {
  if (roots.length === 0) return emptyRoot();
  let acc = roots[roots.length - 1]!;
  for (let i = roots.length - 2; i >= 0; i--) acc = nodeHash(roots[i]!, acc);
  return acc;
}

/** A perfect, aligned subtree: node (height, index) = MTH(D[index * 2^height : (index + 1) * 2^height]). */
export interface PerfectNode {
  height: number;
  index: number;
}

/**
 * A source of perfect-subtree hashes: for every node asked, MTH of its 2^height leaves. Every node asked
 * lies wholly inside the log. The tiles (tiles.ts) are one: the whole proof is one call.
 */
export interface NodeHashSource {
  /** Current number of leaves. */
  size(): Promise<number>;
  nodeHashes(nodes: readonly PerfectNode[]): Promise<Buffer[]>;
}

/**
 * The perfect subtrees MTH(D[a:b]) is made of, left to right. Defined for the subtrees that proofs and
 * tree heads use: `a` a multiple of the largest power of two below `b - a` (so always for a = 0), which
 * makes each piece aligned. Each piece is a bit of `b - a`, largest first.
 */
export function perfectPieces(a: number, b: number): PerfectNode[] {
  if (!isSize(a) || !isSize(b) || b <= a) throw new RangeError(`invalid range [${a}, ${b})`);
  const pieces: PerfectNode[] = [];
  let at = a;
  let rest = b - a;
  while (rest > 0) {
    let height = 0;
    while (2 ** (height + 1) <= rest) height++;
    const width = 2 ** height;
    if (at % width !== 0) throw new RangeError(`range [${a}, ${b}) is not a node of an RFC 9162 tree`);
    pieces.push({ height, index: at / width });
    at += width;
    rest -= width;
  }
  return pieces;
}

/**
 * MTH(D[a:b]) for each range, from the perfect-subtree hashes of a {@link NodeHashSource}, in one call
 * (a proof and the tree heads it joins, read together). Each range must be a node of an RFC 9162
 * tree, as {@link inclusionRanges} and {@link consistencyRanges} give, or start at 0.
 */
export async function rangeHashes(
  src: NodeHashSource,
  ranges: readonly (readonly [number, number])[],
): Promise<Buffer[]> {
  const split = ranges.map(([a, b]) => perfectPieces(a, b));
  const hashes = await src.nodeHashes(split.flat());
  if (hashes.length !== split.reduce((n, p) => n + p.length, 0) || !hashes.every(isHash)) {
    throw new Error('node hash source returned the wrong number or size of hashes');
  }
  let at = 0;
  return split.map((pieces) => {
    const mine = hashes.slice(at, at + pieces.length);
    at += pieces.length;
    return foldRoots(mine);
  });
}

function isNodeSource(src: LeafHashSource | NodeHashSource): src is NodeHashSource {
  return typeof (src as NodeHashSource).nodeHashes === 'function';
}

/** MTH(D[a:b]) of each range from either kind of source. */
async function hashesOf(
  src: LeafHashSource | NodeHashSource,
  ranges: readonly (readonly [number, number])[],
): Promise<Buffer[]> {
  if (isNodeSource(src)) return rangeHashes(src, ranges);
  const out: Buffer[] = [];
  for (const [a, b] of ranges) out.push(await subtreeHash(src, a, b));
  return out;
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

async function checkTreeSize(src: LeafHashSource | NodeHashSource, treeSize: number): Promise<void> {
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
export async function treeHead(src: LeafHashSource | NodeHashSource, size: number): Promise<Buffer> {
  await checkTreeSize(src, size);
  if (size === 0) return emptyRoot();
  return (await hashesOf(src, [[0, size]]))[0]!;
}

/**
 * Generates the RFC 9162 §2.1.3.1 inclusion proof PATH(leafIndex, D[0:treeSize]), ordered from the
 * leaf's sibling up to the root's child, as {@link verifyInclusion} expects.
 *
 * @throws RangeError if `leafIndex >= treeSize` or `treeSize` exceeds the source's size.
 * @see https://www.rfc-editor.org/rfc/rfc9162#section-2.1.3.1
 */
export async function inclusionProof(
  src: LeafHashSource | NodeHashSource,
  leafIndex: number,
  treeSize: number,
): Promise<Buffer[]> {
  await checkTreeSize(src, treeSize);
  if (!isSize(leafIndex) || leafIndex >= treeSize) {
    throw new RangeError(`leaf index ${leafIndex} out of range for tree size ${treeSize}`);
  }
  return hashesOf(src, inclusionRanges(leafIndex, treeSize));
}

/**
 * The subtrees [a, b) whose hashes make up PATH(leafIndex, D[0:treeSize]), leaf's sibling first.
 * PATH(m, D[a:b]): for n = b - a > 1 with split k, PATH(m, D[a:a+k]) : MTH(D[a+k:b]) when m < k,
 * else PATH(m - k, D[a+k:b]) : MTH(D[a:a+k]).
 */
export function inclusionRanges(leafIndex: number, treeSize: number): [number, number][] {
  if (!isSize(leafIndex) || !isSize(treeSize) || leafIndex >= treeSize) {
    throw new RangeError(`leaf index ${leafIndex} out of range for tree size ${treeSize}`);
  }
  const topDown: [number, number][] = [];
  let a = 0;
  let b = treeSize;
  let m = leafIndex;
  while (b - a > 1) {
    const k = splitPoint(b - a);
    if (m < k) {
      topDown.push([a + k, b]);
      b = a + k;
    } else {
      topDown.push([a, a + k]);
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
export async function consistencyProof(
  src: LeafHashSource | NodeHashSource,
  size1: number,
  size2: number,
): Promise<Buffer[]> {
  await checkTreeSize(src, size2);
  if (!isSize(size1) || size1 === 0 || size1 > size2) {
    throw new RangeError(`invalid consistency proof sizes ${size1} -> ${size2}`);
  }
  return hashesOf(src, consistencyRanges(size1, size2));
}

/**
 * The subtrees [a, b) whose hashes make up PROOF(size1, D[0:size2]), in proof order (empty when the
 * sizes are equal). SUBPROOF(m, D[a:b], start): if m == n, [] when start else [MTH(D[a:b])]; otherwise
 * with split k, m <= k: SUBPROOF(m, D[a:a+k], start) : MTH(D[a+k:b]); m > k: SUBPROOF(m - k, D[a+k:b],
 * false) : MTH(D[a:a+k]).
 */
export function consistencyRanges(size1: number, size2: number): [number, number][] {
  if (!isSize(size1) || !isSize(size2) || size1 === 0 || size1 > size2) {
    throw new RangeError(`invalid consistency proof sizes ${size1} -> ${size2}`);
  }
  const topDown: [number, number][] = [];
  let a = 0;
  let b = size2;
  let m = size1;
  let start = true;
  while (m !== b - a) {
    const k = splitPoint(b - a);
    if (m <= k) {
      topDown.push([a + k, b]);
      b = a + k;
    } else {
      topDown.push([a, a + k]);
      a = a + k;
      m -= k;
      start = false;
    }
  }
  if (!start) topDown.push([a, b]);
  return topDown.reverse();
}

/** A {@link LeafHashSource} over an in-memory array of leaf hashes (tests, small logs). */
export function memoryLeafSource(leaves: readonly Buffer[]): LeafHashSource {
  return {
    size: () => Promise.resolve(leaves.length),
    leafHashes: (from, to) => Promise.resolve(leaves.slice(from, to)),
  };
}
