import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { AuditLog } from './audit-log.ts';
import { AuditIndexCheck, type IndexReport } from './audit-index.ts';
import { emptyRoot, perfectRoot } from './merkle-proof.ts';
import {
  archivedLeafTiles,
  checkArchives,
  readArchiveWatermarks,
  type ArchivedReport,
} from './audit-retention.ts';
import type { CheckpointReport, Checkpoints } from './checkpoints.ts';
import type { CosignatureVerifier, WitnessVerifyReport } from './witness.ts';
import { TILE_BYTES, TILE_WIDTH, TileBuilder, Tiles, type Tile } from './tiles.ts';
import {
  copyHeader,
  CopySplitter,
  packRows,
  processBatch,
  type Batch,
  type BatchResult,
  type RowProblem,
} from './verify-batch.ts';

export interface AuditVerifyReport {
  ok: boolean;
  /** Entries verified: the leaves under `rootHash`. */
  size: number;
  /** RFC 9162 Merkle tree head over all leaves, hex (SHA-256("") for an empty log). */
  rootHash: string;
  /** First sequence number that does not verify (hash mismatch, gap, undecodable entry). */
  firstBadSeq: number | undefined;
  problem: 'leaf_hash_mismatch' | 'sequence_gap' | 'undecodable_entry' | undefined;
  /** Write attempts (request ids) with no recorded outcome: a crash or an audit failure after commit. */
  attemptsWithoutOutcome: string[];
  /** Signed checkpoints checked (signature, and root = tree head of the log at that size). */
  checkpoints?: CheckpointReport;
  /** Stored tiles (tiles.ts) compared with the tree recomputed from the entries. */
  tiles: TileReport;
  /** Query index rows (audit-index.ts) compared with the rows recomputed from the entries, in the same
   * pass; absent when the audit database has no index or `index: false`. */
  index?: IndexReport;
  /** Witness cosignatures of the checkpoints (witness.ts); present with the `witnesses` option. */
  witnesses?: WitnessVerifyReport;
  /** Entries moved out by `custos audit archive` (audit-retention.ts): the archived prefix, rebuilt
   * from the stored level-0 tiles and checked against each archive's watermark, signed note and record;
   * absent when nothing was ever archived. */
  archive?: ArchivedReport;
}

export interface TileReport {
  checked: number;
  /** The first stored tile that differs from the recomputed one, or covers entries the log lacks. */
  firstBad: { level: number; index: number } | undefined;
}

export interface VerifyOptions {
  /** Worker threads hashing and decoding entries; 0 hashes on this thread. Default: the machine's
   * cores for a log of 100,000 entries or more, else 0. */
  workers?: number;
  /** Rows per batch (a multiple of 256). */
  batchRows?: number;
  /** Check the query index against the entries too (default true). */
  index?: boolean;
  /** Check the stored witness cosignatures against these witnesses' keys (witness.ts). */
  witnesses?: CosignatureVerifier;
}

const PARALLEL_FROM = 100_000;
const ENTRY_QUERY = 'SELECT seq, entry, leaf_hash FROM audit_entry ORDER BY seq';

/**
 * Recomputes everything from the stored entry bytes: every leaf hash (compared with the stored one),
 * the tree head, every stored tile and every signed checkpoint's root; finds dangling write attempts.
 * The log is streamed (COPY on a PostgreSQL server, pages of rows otherwise) and hashed on worker
 * threads when it is large; the result does not depend on how it was read or hashed.
 */
export async function verifyAuditLog(
  log: AuditLog,
  checkpoints?: Checkpoints,
  opts: VerifyOptions = {},
): Promise<AuditVerifyReport> {
  // Everything read before the entries is covered by them: sizes, checkpoints, stored tile counts.
  const sizeBefore = await log.size();
  const cps = checkpoints ? await checkpoints.list() : undefined;
  const tiles = checkpoints?.tiles ?? new Tiles(log.database, log);
  const storedCounts = await tiles.storedCounts();
  const indexCheck = opts.index === false ? undefined : await AuditIndexCheck.open(log.database);
  const batchSeqs: number[] = [];

  // Entries below the last archive's watermark were moved out (audit-retention.ts).
  const archives = await readArchiveWatermarks(log.database);
  const archivedBefore = archives[archives.length - 1]?.to ?? 0;

  const heads = new Map<number, Buffer>();
  const headSizes = [...new Set([...(cps ?? []).map((c) => c.treeSize), ...archives.map((a) => a.to)])].sort(
    (a, b) => a - b,
  );
  let nextHead = 0;
  const recordHeads = (builder: TileBuilder) => {
    while (nextHead < headSizes.length && headSizes[nextHead] === builder.size) {
      heads.set(builder.size, builder.root());
      nextHead++;
    }
  };

  const tileCheck = new TileChecker(tiles, storedCounts);
  const built: Tile[] = [];
  const builder = new TileBuilder((t) => built.push(t));
  recordHeads(builder);
  /** The next 256 leaf hashes, with their root: whole, or leaf by leaf where a head is wanted inside. */
  const addLeafTile = (hashes: Buffer, root: Buffer) => {
    if (nextHead < headSizes.length && headSizes[nextHead]! < builder.size + TILE_WIDTH) {
      for (let i = 0; i < TILE_WIDTH; i++) {
        builder.addLeaf(hashes.subarray(i * 32, (i + 1) * 32));
        recordHeads(builder);
      }
    } else {
      builder.addLeafTile(hashes, root);
      recordHeads(builder);
    }
  };

  // The archived prefix: its leaf hashes from the stored level-0 tiles (whose roots are recomputed),
  // so that the tree, the heads of the checkpoints and the higher tiles are checked as before.
  let prefixProblem: string | undefined;
  if (archivedBefore > 0) {
    for await (const t of archivedLeafTiles(log.database, archivedBefore / TILE_WIDTH)) {
      if (t.index * TILE_WIDTH !== builder.size || t.hashes.length !== TILE_BYTES) break;
      addLeafTile(t.hashes, perfectRoot(t.hashes, TILE_WIDTH));
      if (built.length >= 256) await tileCheck.compare(built.splice(0));
    }
    await tileCheck.compare(built.splice(0));
    if (builder.size !== archivedBefore)
      prefixProblem = `the stored tiles of the archived entries stop at ${builder.size}`;
  }

  // Sequence gaps are seen while splitting; leaf hash and decoding problems come back with each batch.
  let expected = archivedBefore;
  let ordinal = 0;
  let gap: { ordinal: number; seq: number } | undefined;
  const onSeq = (seq: number) => {
    if (indexCheck) batchSeqs.push(seq);
    // An entry below the archive watermark is one that should not be there: it is named.
    if (gap === undefined && seq !== expected) gap = { ordinal, seq: seq < expected ? seq : expected };
    expected = seq + 1;
    ordinal++;
  };
  let rowBad: { ordinal: number; seq: number; problem: RowProblem } | undefined;
  const pending = new Set<unknown>();

  const consume = async (r: BatchResult, start: number) => {
    if (r.bad && rowBad === undefined)
      rowBad = { ordinal: start + r.bad.index, seq: r.bad.seq, problem: r.bad.problem };
    for (let i = 0; i < r.eventKinds.length; i++) {
      if (r.eventKinds[i] === 1) pending.add(r.eventIds[i]);
      else pending.delete(r.eventIds[i]);
    }
    const leaf = (i: number) => r.leafHashes.subarray(i * 32, (i + 1) * 32);
    const groups = Math.floor(r.count / TILE_WIDTH);
    for (let g = 0; g < groups; g++)
      addLeafTile(
        r.leafHashes.subarray(g * TILE_BYTES, (g + 1) * TILE_BYTES),
        r.roots.subarray(g * 32, (g + 1) * 32),
      );
    for (let i = groups * TILE_WIDTH; i < r.count; i++) {
      builder.addLeaf(leaf(i));
      recordHeads(builder);
    }
    await tileCheck.compare(built.splice(0));
  };

  const batchRows = opts.batchRows ?? 4096;
  if (batchRows <= 0 || batchRows % TILE_WIDTH !== 0)
    throw new RangeError('batchRows must be a multiple of 256');
  const workers = opts.workers ?? (sizeBefore >= PARALLEL_FROM ? Math.min(availableParallelism(), 8) : 0);
  // Workers that cannot start (no tsx, a sandbox without threads) leave the work to this thread.
  const exec = workers > 0 ? await WorkerPool.start(workers).catch(() => undefined) : undefined;
  try {
    const splitter = new CopySplitter(batchRows, onSeq);
    if (exec) exec.onReturn = (buf) => splitter.recycle(buf);
    const inFlight: {
      start: number;
      result: Promise<BatchResult>;
      index: ReturnType<AuditIndexCheck['read']> | undefined;
    }[] = [];
    let submitted = 0;
    const submit = (b: Batch) => {
      const seqs = batchSeqs.splice(0, b.count);
      // The stored index rows of this batch's range are read while its entries are hashed.
      const index = indexCheck?.read(seqs[seqs.length - 1] ?? -1);
      inFlight.push({
        start: submitted,
        result: exec
          ? exec.run(b, !!indexCheck)
          : Promise.resolve(processBatch(b.buf, b.count, !!indexCheck)).then((r) => {
              if (b.buf.byteOffset === 0) splitter.recycle(b.buf.buffer as ArrayBuffer);
              return r;
            }),
        index,
      });
      submitted += b.count;
    };
    const drainTo = async (limit: number) => {
      while (inFlight.length > limit) {
        const next = inFlight.shift()!;
        const r = await next.result;
        await consume(r, next.start);
        if (next.index) await indexCheck!.expect(next.index, r.indexDigest);
      }
    };
    const limit = exec ? workers * 2 : 1;
    for await (const chunk of entryStream(log)) {
      for (const b of splitter.push(chunk)) {
        submit(b);
        await drainTo(limit);
      }
    }
    const last = splitter.end();
    if (last) submit(last);
    await drainTo(0);
  } finally {
    await exec?.close();
  }
  await tileCheck.finish(builder);

  // The first row that does not verify; at one row, a gap is reported before the row's own problems.
  let firstBadSeq: number | undefined;
  let problem: AuditVerifyReport['problem'];
  if (gap && (!rowBad || gap.ordinal <= rowBad.ordinal)) {
    firstBadSeq = gap.seq;
    problem = 'sequence_gap';
  } else if (rowBad) {
    firstBadSeq = rowBad.seq;
    problem = rowBad.problem;
  }
  // The log may have grown while it was read; it may not have fewer entries than it had before.
  if (firstBadSeq === undefined && (expected < sizeBefore || expected > (await log.size()))) {
    firstBadSeq = expected;
    problem = 'sequence_gap';
  }
  const cpReport = checkpoints && cps ? await checkpoints.verifyAll(cps, heads, builder.size) : undefined;
  const witnessReport = opts.witnesses && cps ? await opts.witnesses.verify(cps) : undefined;
  const tileReport = tileCheck.report();
  let archiveReport: ArchivedReport | undefined;
  if (archives.length > 0) {
    archiveReport = await checkArchives(log.database, archives, heads, checkpoints?.verifierKey(), undefined);
    if (prefixProblem) archiveReport.firstBad = { archivedBefore, problem: prefixProblem };
  }
  const indexReport = indexCheck ? await indexCheck.report((from, n) => log.read(from, n)) : undefined;
  return {
    ok:
      firstBadSeq === undefined &&
      cpReport?.firstBadTreeSize === undefined &&
      tileReport.firstBad === undefined &&
      indexReport?.firstBadSeq === undefined &&
      witnessReport?.firstBad === undefined &&
      archiveReport?.firstBad === undefined,
    checkpoints: cpReport,
    tiles: tileReport,
    index: indexReport,
    witnesses: witnessReport,
    archive: archiveReport,
    size: builder.size,
    rootHash: (builder.size === 0 ? emptyRoot() : builder.root()).toString('hex'),
    firstBadSeq,
    problem,
    attemptsWithoutOutcome: [...pending] as string[],
  };
}

/** The stored entries as a COPY BINARY stream: COPY itself on a server, pages of rows packed alike otherwise. */
async function* entryStream(log: AuditLog): AsyncGenerator<Buffer> {
  const db = log.database;
  if (db.copyOut) {
    yield* db.copyOut(ENTRY_QUERY);
    return;
  }
  yield copyHeader();
  const PAGE = 2000;
  for (let from = 0; ;) {
    const rows = await log.read(from, PAGE);
    if (rows.length > 0) yield packRows(rows);
    if (rows.length < PAGE) break;
    from = rows[rows.length - 1]!.seq + 1;
  }
  yield Buffer.from([0xff, 0xff]);
}

/**
 * Compares the tiles the recomputation completes with the stored ones, level by level in index order
 * (a merge: stored tiles may lag behind the log). Only tiles stored before the entries were read are
 * looked at; one of those that the recomputed tree does not have covers entries the log lacks.
 */
class TileChecker {
  private readonly cursors: { it: AsyncGenerator<Tile>; next: Tile | undefined; started: boolean }[] = [];
  private checked = 0;
  private firstBad: { level: number; index: number } | undefined;

  constructor(
    private readonly tiles: Tiles,
    private readonly storedCounts: readonly number[],
  ) {}

  private async peek(level: number): Promise<Tile | undefined> {
    if ((this.storedCounts[level] ?? 0) === 0) return undefined;
    const c = (this.cursors[level] ??= { it: this.tiles.stored(level), next: undefined, started: false });
    if (!c.started) {
      c.started = true;
      c.next = (await c.it.next()).value ?? undefined;
    }
    if (c.next && c.next.index >= this.storedCounts[level]!) c.next = undefined;
    return c.next;
  }

  private async advance(level: number): Promise<void> {
    const c = this.cursors[level]!;
    c.next = (await c.it.next()).value ?? undefined;
  }

  private bad(level: number, index: number): void {
    this.firstBad ??= { level, index };
  }

  async compare(computed: readonly Tile[]): Promise<void> {
    for (const t of computed) {
      let s = await this.peek(t.level);
      while (s && s.index < t.index) {
        // Cannot happen with tiles in order; treat as a stray.
        this.bad(s.level, s.index);
        await this.advance(t.level);
        s = await this.peek(t.level);
      }
      if (s && s.index === t.index) {
        this.checked++;
        if (!s.hashes.equals(t.hashes) || !s.root.equals(t.root)) this.bad(t.level, t.index);
        await this.advance(t.level);
      }
    }
  }

  /** Stored tiles left over once every entry is in: tiles of entries that are not there. */
  async finish(_builder: TileBuilder): Promise<void> {
    for (let level = 0; level < this.storedCounts.length; level++) {
      const s = await this.peek(level);
      if (s) {
        this.checked++;
        this.bad(level, s.index);
      }
      await this.cursors[level]?.it.return(undefined);
    }
  }

  report(): TileReport {
    return { checked: this.checked, firstBad: this.firstBad };
  }
}

/**
 * Worker threads running verify-batch.ts. Workers load TypeScript through tsx's API, registered in
 * the worker itself: a worker does not inherit `--import tsx`, nor `bin/custos.mjs`'s registration.
 */
class WorkerPool {
  private next = 0;
  private seq = 0;
  private readonly waiting = new Map<
    number,
    { resolve: (r: BatchResult) => void; reject: (e: Error) => void }
  >();
  /** Called with each batch's buffer when its worker hands it back. */
  onReturn: (buf: ArrayBuffer) => void = () => {};

  private constructor(private readonly workers: Worker[]) {
    for (const w of workers) {
      w.on('message', (m: { id: number; result?: BatchResult; error?: string; buf?: ArrayBuffer }) => {
        if (m.buf) this.onReturn(m.buf);
        const p = this.waiting.get(m.id);
        if (!p) return;
        this.waiting.delete(m.id);
        if (m.error !== undefined || !m.result)
          p.reject(new Error(`verify worker: ${m.error ?? 'no result'}`));
        else p.resolve(revive(m.result));
      });
      w.on('error', (e) => this.failAll(e));
    }
  }

  static async start(n: number): Promise<WorkerPool> {
    const tsx = import.meta.resolve('tsx/esm/api');
    const script = new URL('./verify-worker.ts', import.meta.url).href;
    const code = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(script)}); });`;
    const workers = Array.from({ length: n }, () => new Worker(code, { eval: true }));
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve, reject) => {
            const onMessage = (m: unknown) => {
              if (m !== 'ready') return;
              w.off('message', onMessage);
              w.off('error', reject);
              resolve();
            };
            w.on('message', onMessage);
            w.once('error', reject);
          }),
      ),
    ).catch(async (e: unknown) => {
      await Promise.all(workers.map((w) => w.terminate()));
      throw e;
    });
    return new WorkerPool(workers);
  }

  run(b: Batch, index = false): Promise<BatchResult> {
    const id = this.seq++;
    const w = this.workers[this.next++ % this.workers.length]!;
    // The batch buffer is moved to the worker; it must own its memory from byte 0.
    const own = b.buf.byteOffset === 0 ? b.buf : Buffer.from(b.buf);
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      w.postMessage({ id, buf: own.buffer, length: own.length, count: b.count, index }, [
        own.buffer as ArrayBuffer,
      ]);
    });
  }

  private failAll(e: Error): void {
    for (const p of this.waiting.values()) p.reject(e);
    this.waiting.clear();
  }

  async close(): Promise<void> {
    this.failAll(new Error('verify workers closed'));
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/** Buffers arrive from a worker as plain Uint8Arrays. */
function revive(r: BatchResult): BatchResult {
  const buf = (u: Uint8Array) => Buffer.from(u.buffer, u.byteOffset, u.byteLength);
  return { ...r, leafHashes: buf(r.leafHashes), roots: buf(r.roots) };
}
